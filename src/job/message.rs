//! The message body of a send job: exactly the Cloud API body minus `messaging_product`/`to`.
//! Every shape is typed, unknown fields are refused, and Meta's length limits are checked here,
//! so a job that would earn 100/131008/131009 from Meta is dead-lettered before any API call.

use serde::{Deserialize, Serialize, Serializer, de::Error as _, ser::SerializeMap};
use serde_json::Value;

/// One broken rule in a message body: which field, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct Violation {
    /// Dotted path of the field, e.g. `message.text.body`.
    pub field: String,
    /// What is wrong, in words a producer can act on.
    pub problem: String,
    /// Which kind of rule: Meta answers each kind with its own error code.
    pub kind: ViolationKind,
}

/// The kind of a broken rule, as Meta distinguishes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViolationKind {
    /// A required field is absent (Meta: 131008).
    Missing,
    /// A field that does not exist or is not allowed here (Meta: 100).
    NotAllowed,
    /// A field is present but its value breaks a rule (Meta: 131009).
    Invalid,
}

impl Violation {
    /// A value that breaks a rule.
    pub fn invalid(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self::new(field, problem, ViolationKind::Invalid)
    }

    /// A required field that is absent.
    pub fn missing(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self::new(field, problem, ViolationKind::Missing)
    }

    /// A field that is not allowed here.
    pub fn not_allowed(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self::new(field, problem, ViolationKind::NotAllowed)
    }

    fn new(field: impl Into<String>, problem: impl Into<String>, kind: ViolationKind) -> Self {
        Violation {
            field: field.into(),
            problem: problem.into(),
            kind,
        }
    }

    /// Turns a serde decoding error into a violation of the right kind. serde words its errors
    /// `missing field …` and `unknown field …`/`unknown variant …`; this is the one place that
    /// reads them.
    pub fn from_serde(field: impl Into<String>, e: &serde_json::Error) -> Self {
        let problem = e.to_string();
        let kind = if problem.starts_with("missing field") {
            ViolationKind::Missing
        } else if problem.starts_with("unknown field") || problem.starts_with("unknown variant") {
            ViolationKind::NotAllowed
        } else {
            ViolationKind::Invalid
        };
        Self::new(field, problem, kind)
    }
}

fn violation(field: impl Into<String>, problem: impl Into<String>) -> Violation {
    Violation::invalid(field, problem)
}

/// Checks a string's length in characters (Meta counts characters, not bytes).
fn check_len(field: &str, value: &str, min: usize, max: usize) -> Result<(), Violation> {
    let len = value.chars().count();
    if len < min {
        return Err(violation(
            field,
            if min == 1 {
                "must not be empty".to_owned()
            } else {
                format!("must be at least {min} characters")
            },
        ));
    }
    if len > max {
        return Err(violation(
            field,
            format!("is {len} characters long, the limit is {max}"),
        ));
    }
    Ok(())
}

fn check_opt_len(field: &str, value: &Option<String>, max: usize) -> Result<(), Violation> {
    value
        .as_deref()
        .map_or(Ok(()), |v| check_len(field, v, 1, max))
}

/// A validated message: its body and an optional reply context.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// What is sent.
    pub body: Body,
    /// Reply to an earlier message.
    pub context: Option<Context>,
}

/// The message types a job may carry, each with its Cloud API object.
#[derive(Debug, Clone, PartialEq)]
#[allow(missing_docs)]
pub enum Body {
    Text(Text),
    Template(Template),
    Image(Media),
    Audio(Media),
    Video(Media),
    Document(Media),
    Sticker(Media),
    Location(Location),
    Contacts(Vec<Value>),
    Interactive(Interactive),
    Reaction(Reaction),
}

impl Body {
    /// The Cloud API `type` value.
    pub fn kind(&self) -> &'static str {
        match self {
            Body::Text(_) => "text",
            Body::Template(_) => "template",
            Body::Image(_) => "image",
            Body::Audio(_) => "audio",
            Body::Video(_) => "video",
            Body::Document(_) => "document",
            Body::Sticker(_) => "sticker",
            Body::Location(_) => "location",
            Body::Contacts(_) => "contacts",
            Body::Interactive(_) => "interactive",
            Body::Reaction(_) => "reaction",
        }
    }
}

/// `context`: reply to a message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Context {
    /// The wamid replied to.
    pub message_id: String,
}

/// `text`: a free-form text message (≤ 4096 characters).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Text {
    /// The text.
    pub body: String,
    /// Whether WhatsApp renders a link preview.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview_url: Option<bool>,
}

/// `image`, `audio`, `video`, `document`, `sticker`: by uploaded media `id` or `link`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct Media {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caption: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filename: Option<String>,
}

/// `location`: a pin. Meta's examples send numbers, its schema says strings: both are accepted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct Location {
    #[serde(deserialize_with = "lenient_f64")]
    pub latitude: f64,
    #[serde(deserialize_with = "lenient_f64")]
    pub longitude: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
}

fn lenient_f64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    match Value::deserialize(d)? {
        Value::Number(n) => n
            .as_f64()
            .ok_or_else(|| D::Error::custom("not a finite number")),
        Value::String(s) => s
            .trim()
            .parse()
            .map_err(|_| D::Error::custom(format!("{s:?} is not a number"))),
        other => Err(D::Error::custom(format!("expected a number, got {other}"))),
    }
}

/// `reaction`: an emoji on an earlier message (an empty emoji removes it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct Reaction {
    pub message_id: String,
    pub emoji: String,
}

/// `template`: a Meta-approved template by name and language, with its parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Template {
    /// Template name: lowercase letters, digits and `_`, ≤ 512.
    pub name: String,
    /// Language (exact locale such as `en_US`).
    pub language: Language,
    /// Parameters per component.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub components: Vec<Component>,
}

/// A template's language; `policy` may only be `deterministic`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct Language {
    pub code: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
}

/// Parameters for one template component (`header`, `body`, `button`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct Component {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parameters: Vec<Parameter>,
}

/// One template parameter: `type` plus the object named after it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct Parameter {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameter_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coupon_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub date_time: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<Media>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub video: Option<Media>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub document: Option<Media>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<Location>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<Value>,
}

/// `interactive`: buttons, lists, CTA URLs, products, flows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct Interactive {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<TextObject>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub footer: Option<TextObject>,
    pub action: Value,
}

/// `{ "text": … }` as used by interactive bodies and footers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct TextObject {
    pub text: String,
}

/// Message types a job may carry.
const MESSAGE_KINDS: &[&str] = &[
    "text",
    "template",
    "image",
    "audio",
    "video",
    "document",
    "sticker",
    "location",
    "contacts",
    "interactive",
    "reaction",
];

/// Interactive types Meta accepts on `/messages`.
const INTERACTIVE_KINDS: &[&str] = &[
    "button",
    "list",
    "cta_url",
    "product",
    "product_list",
    "catalog_message",
    "flow",
    "location_request_message",
    "order_details",
    "order_status",
    "address_message",
    "call_permission_request",
];

/// The wire form of `message`, checked field by field before it becomes a [`Message`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMessage {
    #[serde(rename = "type")]
    kind: String,
    context: Option<Context>,
    text: Option<Value>,
    template: Option<Value>,
    image: Option<Value>,
    audio: Option<Value>,
    video: Option<Value>,
    document: Option<Value>,
    sticker: Option<Value>,
    location: Option<Value>,
    contacts: Option<Value>,
    interactive: Option<Value>,
    reaction: Option<Value>,
}

impl RawMessage {
    fn take(&mut self, kind: &str) -> Option<Value> {
        match kind {
            "text" => self.text.take(),
            "template" => self.template.take(),
            "image" => self.image.take(),
            "audio" => self.audio.take(),
            "video" => self.video.take(),
            "document" => self.document.take(),
            "sticker" => self.sticker.take(),
            "location" => self.location.take(),
            "contacts" => self.contacts.take(),
            "interactive" => self.interactive.take(),
            "reaction" => self.reaction.take(),
            _ => None,
        }
    }

    fn leftover(&self) -> Option<&'static str> {
        [
            ("text", self.text.is_some()),
            ("template", self.template.is_some()),
            ("image", self.image.is_some()),
            ("audio", self.audio.is_some()),
            ("video", self.video.is_some()),
            ("document", self.document.is_some()),
            ("sticker", self.sticker.is_some()),
            ("location", self.location.is_some()),
            ("contacts", self.contacts.is_some()),
            ("interactive", self.interactive.is_some()),
            ("reaction", self.reaction.is_some()),
        ]
        .into_iter()
        .find_map(|(name, present)| present.then_some(name))
    }
}

/// Meta reads a body without `type` as text (its example "Send Text Message with Preview URL" has
/// none), so a `text` object stands for its type; any other body must name its own.
fn with_type(mut value: Value, field: &str) -> Result<Value, Violation> {
    let Some(object) = value.as_object_mut() else {
        return Ok(value);
    };
    if object.contains_key("type") {
        return Ok(value);
    }
    if object.contains_key("text") {
        object.insert("type".into(), Value::from("text"));
        return Ok(value);
    }
    let problem = match MESSAGE_KINDS.iter().find(|k| object.contains_key(**k)) {
        Some(kind) => {
            format!("is required for the {kind} body; only a text body may go without it")
        }
        None => format!(
            "is required, with the object of that name ({})",
            MESSAGE_KINDS.join(", ")
        ),
    };
    Err(Violation::missing(format!("{field}.type"), problem))
}

fn typed<T: serde::de::DeserializeOwned>(field: &str, value: Value) -> Result<T, Violation> {
    serde_json::from_value(value).map_err(|e| Violation::from_serde(field, &e))
}

impl Message {
    /// Decodes and validates `message` from a job (`field` is its path, for error messages).
    pub fn from_value(value: Value, field: &str) -> Result<Self, Violation> {
        let value = with_type(value, field)?;
        // The type decides everything else, so an unknown type is named before unknown fields.
        if let Some(kind) = value.get("type").and_then(Value::as_str)
            && !MESSAGE_KINDS.contains(&kind)
        {
            return Err(Violation::not_allowed(
                format!("{field}.type"),
                format!(
                    "{kind:?} is not a supported message type ({})",
                    MESSAGE_KINDS.join(", ")
                ),
            ));
        }
        let mut raw: RawMessage = typed(field, value)?;
        let kind = raw.kind.clone();
        let path = format!("{field}.{kind}");
        let object = raw.take(&kind).ok_or_else(|| {
            Violation::missing(&path, format!("is required when type is {kind:?}"))
        })?;
        if let Some(extra) = raw.leftover() {
            return Err(Violation::not_allowed(
                format!("{field}.{extra}"),
                format!("is not allowed when type is {kind:?}"),
            ));
        }
        let body = match kind.as_str() {
            "text" => Body::Text(typed(&path, object)?),
            "template" => Body::Template(typed(&path, object)?),
            "image" => Body::Image(typed(&path, object)?),
            "audio" => Body::Audio(typed(&path, object)?),
            "video" => Body::Video(typed(&path, object)?),
            "document" => Body::Document(typed(&path, object)?),
            "sticker" => Body::Sticker(typed(&path, object)?),
            "location" => Body::Location(typed(&path, object)?),
            "contacts" => Body::Contacts(typed(&path, object)?),
            "interactive" => Body::Interactive(typed(&path, object)?),
            "reaction" => Body::Reaction(typed(&path, object)?),
            _ => unreachable!("take() returned an object for an unknown type"),
        };
        let message = Message {
            body,
            context: raw.context,
        };
        message.validate(field)?;
        Ok(message)
    }

    /// Checks Meta's limits on the decoded body.
    pub fn validate(&self, field: &str) -> Result<(), Violation> {
        if let Some(ctx) = &self.context {
            check_len(
                &format!("{field}.context.message_id"),
                &ctx.message_id,
                1,
                256,
            )?;
        }
        let path = format!("{field}.{}", self.body.kind());
        match &self.body {
            Body::Text(t) => check_len(&format!("{path}.body"), &t.body, 1, 4096),
            Body::Template(t) => t.validate(&path),
            Body::Image(m) | Body::Video(m) => m.validate(&path, true, false),
            Body::Document(m) => m.validate(&path, true, true),
            Body::Audio(m) | Body::Sticker(m) => m.validate(&path, false, false),
            Body::Location(l) => l.validate(&path),
            Body::Contacts(c) => validate_contacts(&path, c),
            Body::Interactive(i) => i.validate(&path),
            Body::Reaction(r) => check_len(&format!("{path}.message_id"), &r.message_id, 1, 256),
        }
    }

    /// Whether this is a template (allowed outside the customer-care window).
    pub fn is_template(&self) -> bool {
        matches!(self.body, Body::Template(_))
    }
}

impl Media {
    fn validate(&self, path: &str, caption: bool, filename: bool) -> Result<(), Violation> {
        match (&self.id, &self.link) {
            (Some(id), None) => check_len(&format!("{path}.id"), id, 1, 256)?,
            (None, Some(link)) => {
                if !(link.starts_with("https://") || link.starts_with("http://")) {
                    return Err(violation(format!("{path}.link"), "must be an http(s) URL"));
                }
                check_len(&format!("{path}.link"), link, 1, 2048)?;
            }
            (Some(_), Some(_)) => return Err(violation(path, "give either id or link, not both")),
            (None, None) => {
                return Err(Violation::missing(
                    path,
                    "needs an uploaded media id or a link",
                ));
            }
        }
        match (&self.caption, caption) {
            (Some(_), false) => {
                return Err(violation(
                    format!("{path}.caption"),
                    "is not allowed for this media type",
                ));
            }
            (c, true) => check_opt_len(&format!("{path}.caption"), c, 1024)?,
            (None, false) => {}
        }
        match (&self.filename, filename) {
            (Some(_), false) => Err(violation(
                format!("{path}.filename"),
                "is only allowed for documents",
            )),
            (f, _) => check_opt_len(&format!("{path}.filename"), f, 240),
        }
    }
}

impl Location {
    fn validate(&self, path: &str) -> Result<(), Violation> {
        if !(-90.0..=90.0).contains(&self.latitude) {
            return Err(violation(
                format!("{path}.latitude"),
                "must be between -90 and 90",
            ));
        }
        if !(-180.0..=180.0).contains(&self.longitude) {
            return Err(violation(
                format!("{path}.longitude"),
                "must be between -180 and 180",
            ));
        }
        check_opt_len(&format!("{path}.name"), &self.name, 1000)?;
        check_opt_len(&format!("{path}.address"), &self.address, 1000)
    }
}

fn validate_contacts(path: &str, contacts: &[Value]) -> Result<(), Violation> {
    if contacts.is_empty() {
        return Err(Violation::missing(path, "needs at least one contact"));
    }
    const FIELDS: &[&str] = &[
        "addresses",
        "birthday",
        "emails",
        "name",
        "org",
        "phones",
        "urls",
    ];
    for (i, contact) in contacts.iter().enumerate() {
        let at = format!("{path}[{i}]");
        let object = contact
            .as_object()
            .ok_or_else(|| violation(&at, "must be an object"))?;
        if let Some(unknown) = object.keys().find(|k| !FIELDS.contains(&k.as_str())) {
            return Err(violation(
                format!("{at}.{unknown}"),
                "is not a contact field",
            ));
        }
        let name = object
            .get("name")
            .and_then(|n| n.get("formatted_name"))
            .and_then(Value::as_str);
        match name {
            Some(n) => check_len(&format!("{at}.name.formatted_name"), n, 1, 1000)?,
            None => {
                return Err(violation(
                    format!("{at}.name.formatted_name"),
                    "is required",
                ));
            }
        }
    }
    Ok(())
}

impl Template {
    fn validate(&self, path: &str) -> Result<(), Violation> {
        check_len(&format!("{path}.name"), &self.name, 1, 512)?;
        if !self
            .name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(violation(
                format!("{path}.name"),
                "may contain only lowercase letters, digits and '_'",
            ));
        }
        check_len(&format!("{path}.language.code"), &self.language.code, 2, 15)?;
        if let Some(policy) = &self.language.policy
            && policy != "deterministic"
        {
            return Err(violation(
                format!("{path}.language.policy"),
                format!("{policy:?} is not supported; the only policy is \"deterministic\""),
            ));
        }
        for (i, c) in self.components.iter().enumerate() {
            c.validate(&format!("{path}.components[{i}]"))?;
        }
        Ok(())
    }
}

impl Component {
    fn validate(&self, path: &str) -> Result<(), Violation> {
        let text_limit = match self.kind.as_str() {
            "header" => 60,
            "body" => 1024,
            "button" => {
                if self.sub_type.is_none() {
                    return Err(Violation::missing(
                        format!("{path}.sub_type"),
                        "is required for button components",
                    ));
                }
                match &self.index {
                    Some(Value::Number(n)) if n.as_u64().is_some_and(|i| i < 10) => {}
                    Some(Value::String(s)) if s.parse::<u8>().is_ok_and(|i| i < 10) => {}
                    Some(other) => {
                        return Err(violation(
                            format!("{path}.index"),
                            format!("{other} is not a button index 0-9"),
                        ));
                    }
                    None => {
                        return Err(Violation::missing(
                            format!("{path}.index"),
                            "is required for button components",
                        ));
                    }
                }
                1024
            }
            "footer" | "carousel" | "limited_time_offer" => 1024,
            other => {
                return Err(violation(
                    format!("{path}.type"),
                    format!("{other:?} is not a template component (header, body, button)"),
                ));
            }
        };
        for (i, p) in self.parameters.iter().enumerate() {
            let at = format!("{path}.parameters[{i}]");
            let present = match p.kind.as_str() {
                "text" => p
                    .text
                    .as_deref()
                    .map(|t| check_len(&format!("{at}.text"), t, 1, text_limit)),
                "payload" => p
                    .payload
                    .as_deref()
                    .map(|t| check_len(&format!("{at}.payload"), t, 1, 1000)),
                "coupon_code" => p
                    .coupon_code
                    .as_deref()
                    .map(|t| check_len(&format!("{at}.coupon_code"), t, 1, 15)),
                "currency" => p.currency.as_ref().map(|_| Ok(())),
                "date_time" => p.date_time.as_ref().map(|_| Ok(())),
                "image" => p
                    .image
                    .as_ref()
                    .map(|m| m.validate(&format!("{at}.image"), false, false)),
                "video" => p
                    .video
                    .as_ref()
                    .map(|m| m.validate(&format!("{at}.video"), false, false)),
                "document" => p
                    .document
                    .as_ref()
                    .map(|m| m.validate(&format!("{at}.document"), false, true)),
                "location" => p
                    .location
                    .as_ref()
                    .map(|l| l.validate(&format!("{at}.location"))),
                "action" => p
                    .action
                    .as_ref()
                    .map(|a| validate_action(self.sub_type.as_deref(), &at, a)),
                other => {
                    return Err(violation(
                        format!("{at}.type"),
                        format!("{other:?} is not a template parameter type"),
                    ));
                }
            };
            if action_button(self.sub_type.as_deref()).is_some() && p.kind != "action" {
                return Err(violation(
                    format!("{at}.type"),
                    format!(
                        "a {} button takes an action parameter, not {:?}",
                        self.sub_type.as_deref().unwrap_or_default(),
                        p.kind
                    ),
                ));
            }
            present.ok_or_else(|| {
                Violation::missing(
                    format!("{at}.{}", p.kind),
                    format!("is required when type is {:?}", p.kind),
                )
            })??;
        }
        Ok(())
    }
}

/// Button kinds whose parameter is an `action` object, by lowercase `sub_type`, with the keys
/// that object may hold (Meta's "Send Catalog Template Message" and "Send Flow Template Message"
/// examples; Meta documents every key as optional).
const ACTION_BUTTONS: &[(&str, &[&str])] = &[
    ("catalog", &["thumbnail_product_retailer_id"]),
    ("flow", &["flow_token", "flow_action_data"]),
];

/// The action keys of a catalog or flow button `sub_type` (Meta spells it `catalog` or `CATALOG`).
fn action_button(sub_type: Option<&str>) -> Option<&'static [&'static str]> {
    let sub_type = sub_type?;
    ACTION_BUTTONS
        .iter()
        .find(|(kind, _)| kind.eq_ignore_ascii_case(sub_type))
        .map(|(_, keys)| *keys)
}

/// Checks an `action` parameter at `at` against the button it is given to. An mpm (multi-product)
/// button's action holds product sections and is passed through as an object.
fn validate_action(sub_type: Option<&str>, at: &str, action: &Value) -> Result<(), Violation> {
    let path = format!("{at}.action");
    let is_mpm = sub_type.is_some_and(|s| s.eq_ignore_ascii_case("mpm"));
    let Some(keys) = action_button(sub_type) else {
        if is_mpm {
            return action
                .is_object()
                .then_some(())
                .ok_or_else(|| violation(path, "must be an object"));
        }
        let given = sub_type.map_or("a component without sub_type".into(), |s| {
            format!("a {s} button")
        });
        return Err(violation(
            format!("{at}.type"),
            format!(
                "\"action\" parameters belong to catalog, flow and mpm buttons, not to {given}"
            ),
        ));
    };
    let object = action
        .as_object()
        .ok_or_else(|| violation(&path, "must be an object"))?;
    for (key, value) in object {
        let here = format!("{path}.{key}");
        if !keys.contains(&key.as_str()) {
            return Err(Violation::not_allowed(
                here,
                format!(
                    "is not an action field of a {} button ({})",
                    sub_type.unwrap_or_default(),
                    keys.join(", ")
                ),
            ));
        }
        match (key.as_str(), value) {
            ("flow_action_data", Value::Object(_)) => {}
            ("flow_action_data", _) => {
                return Err(violation(
                    here,
                    "must be an object (the first screen's data)",
                ));
            }
            (_, Value::String(s)) => check_len(&here, s, 1, usize::MAX)?,
            (_, _) => return Err(violation(here, "must be a string")),
        }
    }
    Ok(())
}

impl Interactive {
    fn validate(&self, path: &str) -> Result<(), Violation> {
        if !INTERACTIVE_KINDS.contains(&self.kind.as_str()) {
            return Err(violation(
                format!("{path}.type"),
                format!("{:?} is not an interactive type", self.kind),
            ));
        }
        if let Some(header) = &self.header
            && header.get("type").and_then(Value::as_str) == Some("text")
        {
            let text = header
                .get("text")
                .and_then(Value::as_str)
                .unwrap_or_default();
            check_len(&format!("{path}.header.text"), text, 1, 60)?;
        }
        let needs_body = !matches!(self.kind.as_str(), "product" | "product_list");
        match &self.body {
            Some(b) => check_len(&format!("{path}.body.text"), &b.text, 1, 1024)?,
            None if needs_body => {
                return Err(Violation::missing(format!("{path}.body"), "is required"));
            }
            None => {}
        }
        if let Some(f) = &self.footer {
            check_len(&format!("{path}.footer.text"), &f.text, 1, 60)?;
        }
        let action = format!("{path}.action");
        match self.kind.as_str() {
            "button" => validate_buttons(&action, &self.action),
            "list" => validate_list(&action, &self.action),
            _ => self
                .action
                .is_object()
                .then_some(())
                .ok_or_else(|| Violation::missing(action, "must be an object")),
        }
    }
}

fn str_at<'a>(value: &'a Value, key: &str) -> Option<&'a str> {
    value.get(key).and_then(Value::as_str)
}

fn validate_buttons(path: &str, action: &Value) -> Result<(), Violation> {
    let buttons = action
        .get("buttons")
        .and_then(Value::as_array)
        .ok_or_else(|| violation(format!("{path}.buttons"), "is required"))?;
    if !(1..=3).contains(&buttons.len()) {
        return Err(violation(
            format!("{path}.buttons"),
            format!("has {} buttons, 1 to 3 are allowed", buttons.len()),
        ));
    }
    for (i, b) in buttons.iter().enumerate() {
        let at = format!("{path}.buttons[{i}].reply");
        let reply = b
            .get("reply")
            .ok_or_else(|| Violation::missing(&at, "is required"))?;
        check_len(
            &format!("{at}.id"),
            str_at(reply, "id").unwrap_or_default(),
            1,
            256,
        )?;
        check_len(
            &format!("{at}.title"),
            str_at(reply, "title").unwrap_or_default(),
            1,
            20,
        )?;
    }
    Ok(())
}

fn validate_list(path: &str, action: &Value) -> Result<(), Violation> {
    check_len(
        &format!("{path}.button"),
        str_at(action, "button").unwrap_or_default(),
        1,
        20,
    )?;
    let sections = action
        .get("sections")
        .and_then(Value::as_array)
        .ok_or_else(|| Violation::missing(format!("{path}.sections"), "is required"))?;
    if !(1..=10).contains(&sections.len()) {
        return Err(violation(
            format!("{path}.sections"),
            format!("has {} sections, 1 to 10 are allowed", sections.len()),
        ));
    }
    let mut total_rows = 0;
    for (i, s) in sections.iter().enumerate() {
        let at = format!("{path}.sections[{i}]");
        match str_at(s, "title") {
            Some(t) => check_len(&format!("{at}.title"), t, 1, 24)?,
            None if sections.len() > 1 => {
                return Err(violation(
                    format!("{at}.title"),
                    "is required when there is more than one section",
                ));
            }
            None => {}
        }
        let rows = s
            .get("rows")
            .and_then(Value::as_array)
            .ok_or_else(|| Violation::missing(format!("{at}.rows"), "is required"))?;
        total_rows += rows.len();
        for (j, r) in rows.iter().enumerate() {
            let row = format!("{at}.rows[{j}]");
            check_len(
                &format!("{row}.id"),
                str_at(r, "id").unwrap_or_default(),
                1,
                200,
            )?;
            check_len(
                &format!("{row}.title"),
                str_at(r, "title").unwrap_or_default(),
                1,
                24,
            )?;
            if let Some(d) = str_at(r, "description") {
                check_len(&format!("{row}.description"), d, 1, 72)?;
            }
        }
    }
    if !(1..=10).contains(&total_rows) {
        return Err(violation(
            format!("{path}.sections"),
            format!("have {total_rows} rows in total, 1 to 10 are allowed"),
        ));
    }
    Ok(())
}

impl Serialize for Message {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("type", self.body.kind())?;
        match &self.body {
            Body::Text(t) => map.serialize_entry("text", t)?,
            Body::Template(t) => map.serialize_entry("template", t)?,
            Body::Image(m) => map.serialize_entry("image", m)?,
            Body::Audio(m) => map.serialize_entry("audio", m)?,
            Body::Video(m) => map.serialize_entry("video", m)?,
            Body::Document(m) => map.serialize_entry("document", m)?,
            Body::Sticker(m) => map.serialize_entry("sticker", m)?,
            Body::Location(l) => map.serialize_entry("location", l)?,
            Body::Contacts(c) => map.serialize_entry("contacts", c)?,
            Body::Interactive(i) => map.serialize_entry("interactive", i)?,
            Body::Reaction(r) => map.serialize_entry("reaction", r)?,
        }
        if let Some(ctx) = &self.context {
            map.serialize_entry("context", ctx)?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn decode(v: Value) -> Result<Message, Violation> {
        Message::from_value(v, "message")
    }

    #[test]
    fn every_type_round_trips_through_serialize() {
        let samples = [
            json!({"type":"text","text":{"body":"hi","preview_url":false}}),
            json!({"type":"image","image":{"id":"1003383421387256","caption":"c"}}),
            json!({"type":"document","document":{"link":"https://x.test/inv.pdf","filename":"inv.pdf"}}),
            json!({"type":"audio","audio":{"id":"1"}}),
            json!({"type":"sticker","sticker":{"id":"1"}}),
            json!({"type":"video","video":{"link":"https://x.test/v.mp4"}}),
            json!({"type":"location","location":{"latitude":37.75,"longitude":-122.4,"name":"HQ"}}),
            json!({"type":"contacts","contacts":[{"name":{"formatted_name":"John Smith"},"phones":[{"phone":"+1 650"}]}]}),
            json!({"type":"reaction","reaction":{"message_id":"wamid.X","emoji":"😀"}}),
            json!({"type":"interactive","interactive":{"type":"button","body":{"text":"Confirm?"},
                "action":{"buttons":[{"type":"reply","reply":{"id":"yes","title":"Yes"}}]}}}),
            json!({"type":"template","template":{"name":"order_update","language":{"code":"en_US"},
                "components":[{"type":"body","parameters":[{"type":"text","text":"Jessica"}]},
                              {"type":"button","sub_type":"url","index":"1","parameters":[{"type":"text","text":"order/1"}]}]}}),
            json!({"type":"text","text":{"body":"re"},"context":{"message_id":"wamid.Y"}}),
        ];
        for sample in samples {
            let message = decode(sample.clone()).unwrap_or_else(|e| panic!("{sample}: {e}"));
            assert_eq!(serde_json::to_value(&message).unwrap(), sample);
        }
    }

    #[test]
    fn violations_name_the_field_and_the_limit() {
        let cases = [
            (
                json!({"type":"text","text":{"body":"x".repeat(4097)}}),
                "message.text.body: is 4097 characters long, the limit is 4096",
            ),
            (
                json!({"type":"text"}),
                "message.text: is required when type is \"text\"",
            ),
            (
                json!({"type":"fax","fax":{}}),
                "message.type: \"fax\" is not a supported message type",
            ),
            (
                json!({"type":"text","text":{"body":"a"},"image":{"id":"1"}}),
                "message.image: is not allowed when type is \"text\"",
            ),
            (
                json!({"type":"image","image":{"id":"1","caption":"c".repeat(1025)}}),
                "message.image.caption: is 1025 characters long, the limit is 1024",
            ),
            (
                json!({"type":"audio","audio":{"id":"1","caption":"c"}}),
                "message.audio.caption: is not allowed for this media type",
            ),
            (
                json!({"type":"image","image":{}}),
                "message.image: needs an uploaded media id or a link",
            ),
            (
                json!({"type":"location","location":{"latitude":91,"longitude":0}}),
                "message.location.latitude: must be between -90 and 90",
            ),
            (
                json!({"type":"template","template":{"name":"Order Update","language":{"code":"en"}}}),
                "message.template.name: may contain only lowercase",
            ),
            (
                json!({"type":"template","template":{"name":"a","language":{"code":"en","policy":"fallback"}}}),
                "message.template.language.policy: \"fallback\" is not supported",
            ),
            (
                json!({"type":"template","template":{"name":"a","language":{"code":"en"},
                "components":[{"type":"header","parameters":[{"type":"text","text":"h".repeat(61)}]}]}}),
                "message.template.components[0].parameters[0].text: is 61 characters long, the limit is 60",
            ),
            (
                json!({"type":"interactive","interactive":{"type":"button","body":{"text":"?"},"action":{"buttons":[
                {"reply":{"id":"1","title":"a"}},{"reply":{"id":"2","title":"b"}},{"reply":{"id":"3","title":"c"}},{"reply":{"id":"4","title":"d"}}]}}}),
                "message.interactive.action.buttons: has 4 buttons, 1 to 3 are allowed",
            ),
            (
                json!({"type":"text","text":{"body":"a","bdy":"b"}}),
                "message.text: unknown field `bdy`",
            ),
        ];
        for (input, expected) in cases {
            let err = decode(input.clone())
                .expect_err(&input.to_string())
                .to_string();
            assert!(
                err.starts_with(expected),
                "{input}\n got: {err}\nwant: {expected}"
            );
        }
    }

    /// Meta's "Send Catalog Template Message" and "Send Flow Template Message" examples, as jobs.
    fn catalog_and_flow_templates() -> [Value; 2] {
        [
            json!({"type":"template","template":{"name":"intro_catalog_offer","language":{"code":"en_US"},
                "components":[{"type":"body","parameters":[{"type":"text","text":"100"},{"type":"text","text":"400"},{"type":"text","text":"3"}]},
                              {"type":"button","sub_type":"CATALOG","index":0,"parameters":[
                                  {"type":"action","action":{"thumbnail_product_retailer_id":"2lc20305pt"}}]}]}}),
            json!({"type":"template","template":{"name":"survey_invite","language":{"code":"en_US"},
                "components":[{"type":"button","sub_type":"flow","index":"0","parameters":[
                    {"type":"action","action":{"flow_token":"tok-1","flow_action_data":{"source":"ad"}}}]}]}}),
        ]
    }

    #[test]
    fn catalog_and_flow_buttons_keep_their_action_unchanged() {
        for sample in catalog_and_flow_templates() {
            let message = decode(sample.clone()).unwrap_or_else(|e| panic!("{sample}: {e}"));
            assert_eq!(serde_json::to_value(&message).unwrap(), sample);
        }
        // Meta documents every action field as optional.
        let mut bare = catalog_and_flow_templates()[1].clone();
        bare["template"]["components"][0]["parameters"][0]["action"] = json!({});
        assert!(decode(bare).is_ok());
    }

    #[test]
    fn a_bad_action_parameter_is_named_by_its_path() {
        let at = "message.template.components[0].parameters[0]";
        let flow = |parameter: Value| {
            let mut m = catalog_and_flow_templates()[1].clone();
            m["template"]["components"][0]["parameters"][0] = parameter;
            m
        };
        let on = |sub_type: &str, parameter: Value| {
            let mut m = flow(parameter);
            m["template"]["components"][0]["sub_type"] = json!(sub_type);
            m
        };
        let cases = [
            (
                flow(json!({"type":"action","action":{"flow_token":7}})),
                format!("{at}.action.flow_token: must be a string"),
            ),
            (
                flow(json!({"type":"action","action":{"flow_token":""}})),
                format!("{at}.action.flow_token: must not be empty"),
            ),
            (
                flow(json!({"type":"action","action":{"flow_action_data":"screen=1"}})),
                format!("{at}.action.flow_action_data: must be an object"),
            ),
            (
                flow(json!({"type":"action","action":{"thumbnail_product_retailer_id":"x"}})),
                format!(
                    "{at}.action.thumbnail_product_retailer_id: is not an action field of a flow button (flow_token, flow_action_data)"
                ),
            ),
            (
                flow(json!({"type":"action","action":["tok-1"]})),
                format!("{at}.action: must be an object"),
            ),
            (
                flow(json!({"type":"action"})),
                format!("{at}.action: is required when type is \"action\""),
            ),
            (
                flow(json!({"type":"text","text":"tok-1"})),
                format!("{at}.type: a flow button takes an action parameter, not \"text\""),
            ),
            (
                on(
                    "catalog",
                    json!({"type":"action","action":{"flow_token":"tok-1"}}),
                ),
                format!(
                    "{at}.action.flow_token: is not an action field of a catalog button (thumbnail_product_retailer_id)"
                ),
            ),
            (
                on(
                    "url",
                    json!({"type":"action","action":{"flow_token":"tok-1"}}),
                ),
                format!(
                    "{at}.type: \"action\" parameters belong to catalog, flow and mpm buttons, not to a url button"
                ),
            ),
        ];
        for (input, expected) in cases {
            let err = decode(input.clone())
                .expect_err(&input.to_string())
                .to_string();
            assert!(
                err.starts_with(&expected),
                "{input}\n got: {err}\nwant: {expected}"
            );
        }
    }

    #[test]
    fn a_body_without_type_is_text_as_meta_reads_it() {
        let message = decode(json!({"text":{"body":"hi","preview_url":true}})).unwrap();
        assert_eq!(
            serde_json::to_value(&message).unwrap(),
            json!({"type":"text","text":{"body":"hi","preview_url":true}})
        );
        let cases = [
            (
                json!({"image":{"id":"1"}}),
                "message.type: is required for the image body; only a text body may go without it",
            ),
            (
                json!({}),
                "message.type: is required, with the object of that name",
            ),
            (
                json!({"text":{"body":"a"},"image":{"id":"1"}}),
                "message.image: is not allowed when type is \"text\"",
            ),
        ];
        for (input, expected) in cases {
            let err = decode(input.clone()).expect_err(&input.to_string());
            assert!(err.to_string().starts_with(expected), "{input}: {err}");
        }
        assert_eq!(decode(json!({})).unwrap_err().kind, ViolationKind::Missing);
    }

    #[test]
    fn text_limit_counts_characters_not_bytes() {
        assert!(decode(json!({"type":"text","text":{"body":"ä".repeat(4096)}})).is_ok());
    }
}
