//! What a simulated Cloud API world holds: numbers and their limits, templates, users, webhook
//! delivery, fault rates and a timeline of events. Loaded from a TOML scenario file
//! (`scenarios/*.toml`, format in `scenarios/README.md`) or built in code by tests.

use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};

/// A complete simulator set-up.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// One line saying what this scenario is for.
    #[serde(default)]
    pub description: String,
    /// Bearer tokens accepted (anything else → 190).
    #[serde(default)]
    pub tokens: Vec<String>,
    /// Business numbers.
    pub numbers: Vec<SimNumber>,
    /// Templates, per WABA.
    #[serde(default)]
    pub templates: Vec<SimTemplate>,
    /// Users the scenario knows by number.
    #[serde(default)]
    pub users: Vec<SimUser>,
    /// How recipients not listed in `users` behave.
    #[serde(default)]
    pub unknown_users: UnknownUsers,
    /// Meta's per-(number, recipient) pair rate.
    #[serde(default)]
    pub pair_rate: PairRate,
    /// Status and event webhooks.
    #[serde(default)]
    pub webhooks: WebhookSettings,
    /// Random faults and latency.
    #[serde(default)]
    pub faults: Faults,
    /// Things that happen on their own while the simulator runs.
    #[serde(default)]
    pub timeline: Vec<TimedAction>,
}

/// A business phone number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimNumber {
    /// Cloud API id of the number.
    pub phone_number_id: String,
    /// The WhatsApp Business Account (portfolio) it belongs to.
    pub waba_id: String,
    /// As shown to users, e.g. `+1 555-078-3881`.
    #[serde(default = "default_display")]
    pub display_phone_number: String,
    /// Business name shown to users.
    #[serde(default = "default_verified_name")]
    pub verified_name: String,
    /// Messages per second before 130429 (default 80; 20 for coexistence numbers).
    #[serde(default)]
    pub throughput_mps: Option<u32>,
    /// Used with the WhatsApp Business app too: throughput fixed at 20.
    #[serde(default)]
    pub coexistence: bool,
    /// `GREEN`, `YELLOW`, `RED` or `NA`.
    #[serde(default = "default_quality")]
    pub quality_rating: String,
    /// Portfolio messaging limit, `TIER_250` … `TIER_UNLIMITED`.
    #[serde(default = "default_tier")]
    pub messaging_limit: String,
}

fn default_display() -> String {
    "+1 555-000-0000".into()
}
fn default_verified_name() -> String {
    "wa-sender simulator".into()
}
fn default_quality() -> String {
    "GREEN".into()
}
fn default_tier() -> String {
    "TIER_250".into()
}

impl SimNumber {
    /// A standard number at 80 msg/s.
    pub fn new(phone_number_id: &str, waba_id: &str) -> Self {
        SimNumber {
            phone_number_id: phone_number_id.into(),
            waba_id: waba_id.into(),
            display_phone_number: default_display(),
            verified_name: default_verified_name(),
            throughput_mps: None,
            coexistence: false,
            quality_rating: default_quality(),
            messaging_limit: default_tier(),
        }
    }

    /// Messages per second this number may send.
    pub fn throughput(&self) -> u32 {
        match (self.throughput_mps, self.coexistence) {
            (_, true) => 20,
            (Some(mps), false) => mps,
            (None, false) => 80,
        }
    }

    /// Meta's `throughput.level`: `HIGH` after an upgrade to 1,000 msg/s.
    pub fn throughput_level(&self) -> &'static str {
        if self.throughput() >= 1000 {
            "HIGH"
        } else {
            "STANDARD"
        }
    }
}

/// Positional (`{{1}}`) or named (`{{first_name}}`) template parameters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ParameterFormat {
    /// `{{1}}`, `{{2}}`, … sent without names.
    #[default]
    Positional,
    /// `{{first_name}}`, sent with `parameter_name`.
    Named,
}

/// A template as Meta's registry holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimTemplate {
    /// Meta's id (assigned when empty).
    #[serde(default)]
    pub id: String,
    /// The WABA that owns it (default: the first number's).
    #[serde(default)]
    pub waba_id: String,
    /// Name.
    pub name: String,
    /// Language code, e.g. `en_US`.
    pub language: String,
    /// `APPROVED`, `PAUSED`, `DISABLED`, `PENDING`, `REJECTED`, …
    #[serde(default = "default_status")]
    pub status: String,
    /// `MARKETING`, `UTILITY`, `AUTHENTICATION`.
    pub category: String,
    /// How parameters are named.
    #[serde(default)]
    pub parameter_format: ParameterFormat,
    /// Header: `TEXT` (with `header_text`), `IMAGE`, `VIDEO`, `DOCUMENT`, `LOCATION`.
    #[serde(default)]
    pub header_format: Option<String>,
    /// Header text, at most one parameter.
    #[serde(default)]
    pub header_text: Option<String>,
    /// Body text with `{{…}}` placeholders.
    pub body: String,
    /// Footer text (no parameters).
    #[serde(default)]
    pub footer: Option<String>,
    /// Buttons in order; a URL button whose `url` holds `{{1}}`, and every `OTP` button, takes
    /// one parameter; a `QUICK_REPLY` may take a payload, a `CATALOG` or `FLOW` button an action.
    #[serde(default)]
    pub buttons: Vec<SimButton>,
}

fn default_status() -> String {
    "APPROVED".into()
}

/// A template button.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimButton {
    /// `QUICK_REPLY`, `URL`, `PHONE_NUMBER`, `COPY_CODE`, `OTP`, `CATALOG`, `FLOW`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Label.
    pub text: String,
    /// For `URL` buttons; `{{1}}` makes it dynamic.
    #[serde(default)]
    pub url: Option<String>,
}

impl SimTemplate {
    /// A positional template with only a body.
    pub fn new(name: &str, language: &str, category: &str, body: &str) -> Self {
        SimTemplate {
            id: String::new(),
            waba_id: String::new(),
            name: name.into(),
            language: language.into(),
            status: default_status(),
            category: category.into(),
            parameter_format: ParameterFormat::Positional,
            header_format: None,
            header_text: None,
            body: body.into(),
            footer: None,
            buttons: Vec::new(),
        }
    }

    /// This template with one more button: `kind` as Meta spells it (`URL`, `OTP`, …), its
    /// label, and for a URL button its link.
    pub fn with_button(mut self, kind: &str, text: &str, url: Option<&str>) -> Self {
        self.buttons.push(SimButton {
            kind: kind.into(),
            text: text.into(),
            url: url.map(str::to_owned),
        });
        self
    }

    /// Placeholder names in the body, in order (`"1"`, `"2"` or `"first_name"`).
    pub fn body_params(&self) -> Vec<String> {
        placeholders(&self.body)
    }

    /// Placeholders in the header text.
    pub fn header_params(&self) -> Vec<String> {
        self.header_text
            .as_deref()
            .map(placeholders)
            .unwrap_or_default()
    }

    /// Whether button `index` takes a parameter.
    pub fn button_takes_param(&self, index: usize) -> bool {
        self.buttons
            .get(index)
            .is_some_and(|b| b.kind == "OTP" || b.url.as_deref().is_some_and(|u| u.contains("{{")))
    }
}

/// `{{name}}` placeholders of a text, in order of appearance.
pub fn placeholders(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else { break };
        names.push(after[..end].trim().to_owned());
        rest = &after[end + 2..];
    }
    names
}

/// `subscribed` or `stopped` for marketing messages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Marketing {
    /// Receives marketing templates.
    #[default]
    Subscribed,
    /// Stopped marketing from this business: marketing templates fail with 131050.
    Stopped,
}

/// A WhatsApp user the scenario knows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimUser {
    /// Their WhatsApp id (digits).
    pub wa_id: String,
    /// Profile name in inbound webhooks.
    #[serde(default = "default_user_name")]
    pub name: String,
    /// They wrote to every number this many minutes before start (opens the 24 h window);
    /// absent: the window is closed.
    #[serde(default)]
    pub last_inbound_minutes_ago: Option<u64>,
    /// Marketing preference.
    #[serde(default)]
    pub marketing: Marketing,
    /// `false`: not a WhatsApp user, every message fails with 131026.
    #[serde(default = "yes")]
    pub reachable: bool,
    /// Marketing templates per rolling 24 h before 131049 (none: no cap).
    #[serde(default)]
    pub marketing_cap_per_day: Option<u32>,
    /// Whether they read what is delivered.
    #[serde(default = "yes")]
    pub reads: bool,
}

fn default_user_name() -> String {
    "Simulated User".into()
}
fn yes() -> bool {
    true
}

impl SimUser {
    /// A reachable user with a closed window.
    pub fn new(wa_id: &str) -> Self {
        SimUser {
            wa_id: wa_id.into(),
            name: default_user_name(),
            last_inbound_minutes_ago: None,
            marketing: Marketing::Subscribed,
            reachable: true,
            marketing_cap_per_day: None,
            reads: true,
        }
    }
}

/// How recipients not listed in `users` behave.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UnknownUsers {
    /// Their window is open (as if they had just written).
    pub window_open: bool,
    /// Share that are not on WhatsApp (131026), 0.0–1.0.
    pub unreachable_share: f64,
    /// Share of delivered messages they read.
    pub read_share: f64,
}

impl Default for UnknownUsers {
    fn default() -> Self {
        UnknownUsers {
            window_open: false,
            unreachable_share: 0.0,
            read_share: 0.6,
        }
    }
}

/// Meta's pair rate: one message per `period_s` to the same user, bursts of up to `burst`
/// that borrow from future quota.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PairRate {
    /// Seconds per message at the sustained rate.
    pub period_s: f64,
    /// Messages allowed in one burst (within one period).
    pub burst: u32,
}

impl Default for PairRate {
    fn default() -> Self {
        PairRate {
            period_s: 6.0,
            burst: 45,
        }
    }
}

impl PairRate {
    /// The sustained interval between two messages.
    pub fn period(&self) -> Duration {
        Duration::from_secs_f64(self.period_s.max(0.0))
    }
}

/// A delay drawn uniformly between two bounds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DelayRange {
    /// Lower bound, milliseconds.
    pub min_ms: u64,
    /// Upper bound, milliseconds.
    pub max_ms: u64,
}

impl DelayRange {
    /// A fixed delay.
    pub const fn fixed(ms: u64) -> Self {
        DelayRange {
            min_ms: ms,
            max_ms: ms,
        }
    }

    /// One draw.
    pub fn sample(&self) -> Duration {
        let ms = if self.max_ms > self.min_ms {
            rand::rng().random_range(self.min_ms..=self.max_ms)
        } else {
            self.min_ms
        };
        Duration::from_millis(ms)
    }
}

/// Where and how webhooks are delivered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookSettings {
    /// Callback URL; none: webhooks are built and counted but not posted.
    pub url: Option<String>,
    /// App secret for `X-Hub-Signature-256`.
    pub app_secret: String,
    /// Acceptance → `sent`.
    pub sent_after: DelayRange,
    /// `sent` → `delivered`.
    pub delivered_after: DelayRange,
    /// `delivered` → `read`.
    pub read_after: DelayRange,
    /// Share of status updates posted twice.
    pub duplicate_share: f64,
    /// Share of messages whose `read` is posted before their `delivered`.
    pub reorder_share: f64,
    /// Most updates in one POST.
    pub batch_max: usize,
    /// How long a batch waits for more updates, milliseconds.
    pub batch_wait_ms: u64,
    /// POSTs in flight at once.
    pub concurrency: usize,
    /// Attempts per POST before it is given up (Meta: 7 days; bounded here).
    pub max_attempts: u32,
    /// First retry delay, milliseconds (doubling, with jitter).
    pub retry_min_ms: u64,
    /// Longest retry delay, milliseconds.
    pub retry_max_ms: u64,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        WebhookSettings {
            url: None,
            app_secret: "sim-app-secret".into(),
            sent_after: DelayRange {
                min_ms: 50,
                max_ms: 300,
            },
            delivered_after: DelayRange {
                min_ms: 200,
                max_ms: 2_000,
            },
            read_after: DelayRange {
                min_ms: 1_000,
                max_ms: 10_000,
            },
            duplicate_share: 0.0,
            reorder_share: 0.0,
            batch_max: 50,
            batch_wait_ms: 50,
            concurrency: 8,
            max_attempts: 8,
            retry_min_ms: 200,
            retry_max_ms: 30_000,
        }
    }
}

/// Random faults on the send endpoint and its latency.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Faults {
    /// Share answered 500 with Meta's body, code 131016 (not sent).
    pub transient_share: f64,
    /// Share answered a bare 502 from a "proxy" (not sent).
    pub bad_gateway_share: f64,
    /// Share whose connection is reset before an answer (not sent).
    pub reset_share: f64,
    /// Share that is sent but answered only after `timeout_ms` (the client gives up first).
    pub timeout_share: f64,
    /// How long a "timeout" holds the answer, milliseconds.
    pub timeout_ms: u64,
    /// Latency added to every request.
    pub latency: Latency,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            transient_share: 0.0,
            bad_gateway_share: 0.0,
            reset_share: 0.0,
            timeout_share: 0.0,
            timeout_ms: 30_000,
            latency: Latency::default(),
        }
    }
}

/// Log-normal latency given by its median and 99th percentile (zero: none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Latency {
    /// Median, milliseconds.
    pub median_ms: f64,
    /// 99th percentile, milliseconds (≥ median).
    pub p99_ms: f64,
}

impl Latency {
    /// One draw: exp(N(ln median, σ)) with σ chosen so that the 99th percentile is `p99_ms`.
    pub fn sample(&self) -> Duration {
        if self.median_ms <= 0.0 {
            return Duration::ZERO;
        }
        const Z99: f64 = 2.326_347_874;
        let sigma = (self.p99_ms.max(self.median_ms) / self.median_ms).ln() / Z99;
        // Box–Muller from two uniforms.
        let mut rng = rand::rng();
        let (u1, u2): (f64, f64) = (rng.random_range(f64::EPSILON..1.0), rng.random());
        let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
        Duration::from_secs_f64(self.median_ms * (sigma * z).exp() / 1000.0)
    }
}

/// An action that happens `after_ms` after the simulator starts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimedAction {
    /// Milliseconds after start.
    pub after_ms: u64,
    /// What happens.
    #[serde(flatten)]
    pub action: Action,
}

/// Something a user or Meta does on its own: each emits the webhook Meta would send.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
pub enum Action {
    /// A user writes to a business number (opens or refreshes the 24 h window).
    Inbound {
        /// The user.
        from: String,
        /// The business number.
        phone_number_id: String,
        /// Text they send (e.g. `STOP`).
        text: String,
    },
    /// A user stops or resumes marketing from the business (`user_preferences`).
    MarketingPreference {
        /// The user.
        wa_id: String,
        /// The business number the webhook names.
        phone_number_id: String,
        /// Stop or resume.
        value: Marketing,
    },
    /// Meta changes a template's status (`message_template_status_update`).
    TemplateStatus {
        /// The WABA owning the template (default: the first number's).
        #[serde(default)]
        waba_id: Option<String>,
        /// Template name.
        name: String,
        /// Language code.
        language: String,
        /// New status: `APPROVED`, `PAUSED`, `DISABLED`, …
        status: String,
    },
    /// Meta upgrades a number to 1,000 msg/s: 131057 during `maintenance_ms`, then a
    /// `phone_number_quality_update` with `THROUGHPUT_UPGRADE`.
    ThroughputUpgrade {
        /// The number.
        phone_number_id: String,
        /// How long sends answer 131057, milliseconds.
        #[serde(default = "default_maintenance_ms")]
        maintenance_ms: u64,
    },
}

fn default_maintenance_ms() -> u64 {
    1_000
}

/// Why a scenario is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// The file cannot be read.
    #[error("cannot read scenario {path}: {source}")]
    Read {
        /// Path given.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The TOML does not describe a scenario.
    #[error("scenario {path} is not valid: {source}")]
    Parse {
        /// Path given.
        path: String,
        /// Cause.
        source: toml::de::Error,
    },
    /// The contents contradict each other.
    #[error("scenario {path}: {problem}")]
    Invalid {
        /// Path given.
        path: String,
        /// What is wrong.
        problem: String,
    },
}

impl Scenario {
    /// One number, one token, a few approved templates, no faults, no webhooks posted.
    pub fn single(phone_number_id: &str, waba_id: &str, token: &str) -> Self {
        let otp = SimTemplate::new(
            "otp_code",
            "en_US",
            "AUTHENTICATION",
            "{{1}} is your verification code.",
        )
        .with_button("OTP", "Copy code", None);
        let mut sale = SimTemplate::new(
            "spring_sale",
            "en_US",
            "MARKETING",
            "Hi {{1}}, our spring sale is on!",
        )
        .with_button("QUICK_REPLY", "Stop promotions", None);
        sale.footer = Some("Not interested? Tap Stop promotions".into());
        // Meta's catalog template example, and a template opening a flow.
        let catalog = SimTemplate::new(
            "intro_catalog_offer",
            "en_US",
            "MARKETING",
            "Now shop for your favourite products right here on WhatsApp! Get Rs {{1}} off on all orders above {{2}}Rs! Valid for your first {{3}} orders placed on WhatsApp!",
        )
        .with_button("CATALOG", "View catalog", None);
        let survey = SimTemplate::new(
            "survey_invite",
            "en_US",
            "MARKETING",
            "How did we do? Tell us in two minutes.",
        )
        .with_button("FLOW", "Take the survey", None);
        let mut tracking = SimTemplate::new(
            "delivery_tracking",
            "en_US",
            "UTILITY",
            "Hi {{1}}, parcel {{2}} is on its way.",
        )
        .with_button(
            "URL",
            "Track parcel",
            Some("https://example.com/track/{{1}}"),
        );
        tracking.header_format = Some("IMAGE".into());
        let mut scenario = Scenario {
            description: "one number, six templates".into(),
            tokens: vec![token.to_owned()],
            numbers: vec![SimNumber::new(phone_number_id, waba_id)],
            templates: vec![
                SimTemplate::new(
                    "order_update",
                    "en_US",
                    "UTILITY",
                    "Hello {{1}}, your order {{2}} has shipped.",
                ),
                otp,
                sale,
                catalog,
                survey,
                tracking,
            ],
            users: Vec::new(),
            unknown_users: UnknownUsers::default(),
            pair_rate: PairRate::default(),
            webhooks: WebhookSettings::default(),
            faults: Faults::default(),
            timeline: Vec::new(),
        };
        scenario.normalise();
        scenario
    }

    /// Reads and checks a TOML scenario file.
    pub fn load(path: &str) -> Result<Self, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: path.into(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ScenarioError::Parse { source, .. } => ScenarioError::Parse {
                path: path.into(),
                source,
            },
            ScenarioError::Invalid { problem, .. } => ScenarioError::Invalid {
                path: path.into(),
                problem,
            },
            other => other,
        })
    }

    /// Parses and checks TOML text.
    pub fn parse(text: &str) -> Result<Self, ScenarioError> {
        let mut scenario: Scenario =
            toml::from_str(text).map_err(|source| ScenarioError::Parse {
                path: String::new(),
                source,
            })?;
        scenario.check().map_err(|problem| ScenarioError::Invalid {
            path: String::new(),
            problem,
        })?;
        scenario.normalise();
        Ok(scenario)
    }

    /// The number with this id.
    pub fn number(&self, phone_number_id: &str) -> Option<&SimNumber> {
        self.numbers
            .iter()
            .find(|n| n.phone_number_id == phone_number_id)
    }

    /// The number with this id, to change it.
    pub fn number_mut(&mut self, phone_number_id: &str) -> Option<&mut SimNumber> {
        self.numbers
            .iter_mut()
            .find(|n| n.phone_number_id == phone_number_id)
    }

    /// The template `name` in `language` of this WABA.
    pub fn template(&self, waba_id: &str, name: &str, language: &str) -> Option<&SimTemplate> {
        self.templates
            .iter()
            .find(|t| t.waba_id == waba_id && t.name == name && t.language == language)
    }

    fn check(&self) -> Result<(), String> {
        if self.numbers.is_empty() {
            return Err("needs at least one [[numbers]] entry".into());
        }
        for (i, n) in self.numbers.iter().enumerate() {
            if self.numbers[..i]
                .iter()
                .any(|m| m.phone_number_id == n.phone_number_id)
            {
                return Err(format!("number {} is listed twice", n.phone_number_id));
            }
            if n.throughput() == 0 {
                return Err(format!(
                    "number {}: throughput_mps must be > 0",
                    n.phone_number_id
                ));
            }
        }
        let shares = [
            ("faults.transient_share", self.faults.transient_share),
            ("faults.bad_gateway_share", self.faults.bad_gateway_share),
            ("faults.reset_share", self.faults.reset_share),
            ("faults.timeout_share", self.faults.timeout_share),
            ("webhooks.duplicate_share", self.webhooks.duplicate_share),
            ("webhooks.reorder_share", self.webhooks.reorder_share),
            (
                "unknown_users.unreachable_share",
                self.unknown_users.unreachable_share,
            ),
            ("unknown_users.read_share", self.unknown_users.read_share),
        ];
        if let Some((name, value)) = shares.iter().find(|(_, v)| !(0.0..=1.0).contains(v)) {
            return Err(format!("{name} is {value}; a share is between 0.0 and 1.0"));
        }
        let fault_total: f64 = shares[..4].iter().map(|(_, v)| v).sum();
        if fault_total > 1.0 {
            return Err(format!(
                "fault shares add up to {fault_total}, more than 1.0"
            ));
        }
        if self.faults.latency.p99_ms < self.faults.latency.median_ms {
            return Err("faults.latency.p99_ms must be ≥ median_ms".into());
        }
        if self.pair_rate.burst == 0 || self.pair_rate.period_s <= 0.0 {
            return Err("pair_rate needs burst ≥ 1 and period_s > 0".into());
        }
        if self.webhooks.batch_max == 0 || self.webhooks.concurrency == 0 {
            return Err("webhooks.batch_max and webhooks.concurrency must be ≥ 1".into());
        }
        for t in &self.templates {
            let params = t.body_params();
            let named = params.iter().any(|p| p.parse::<u32>().is_err());
            if named != (t.parameter_format == ParameterFormat::Named) && !params.is_empty() {
                return Err(format!(
                    "template {}: placeholders {params:?} do not match parameter_format {:?}",
                    t.name, t.parameter_format
                ));
            }
            if t.header_params().len() > 1 {
                return Err(format!(
                    "template {}: a header takes at most one parameter",
                    t.name
                ));
            }
        }
        Ok(())
    }

    /// Fills in defaults that depend on other entries: template WABA and ids.
    pub(crate) fn normalise(&mut self) {
        let first_waba = self
            .numbers
            .first()
            .map(|n| n.waba_id.clone())
            .unwrap_or_default();
        for (i, t) in self.templates.iter_mut().enumerate() {
            if t.waba_id.is_empty() {
                t.waba_id.clone_from(&first_waba);
            }
            if t.id.is_empty() {
                t.id = format!("{}", 900_000_000_000_000u64 + i as u64);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_read_in_order() {
        assert_eq!(placeholders("Hi {{1}}, order {{2}}"), ["1", "2"]);
        assert_eq!(placeholders("Hi {{ first_name }}!"), ["first_name"]);
        assert!(placeholders("no params {{").is_empty());
    }

    #[test]
    fn coexistence_numbers_are_fixed_at_20() {
        let mut n = SimNumber::new("1", "2");
        n.throughput_mps = Some(1000);
        assert_eq!(n.throughput_level(), "HIGH");
        n.coexistence = true;
        assert_eq!(n.throughput(), 20);
    }

    #[test]
    fn bad_scenarios_name_the_problem() {
        let e = Scenario::parse("").unwrap_err().to_string();
        assert!(e.contains("numbers"), "{e}");
        let e = Scenario::parse(
            "[[numbers]]\nphone_number_id = \"1\"\nwaba_id = \"2\"\n[faults]\ntransient_share = 2.0\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("faults.transient_share"), "{e}");
    }

    #[test]
    fn latency_median_is_about_right() {
        let l = Latency {
            median_ms: 20.0,
            p99_ms: 200.0,
        };
        let mut draws: Vec<Duration> = (0..4001).map(|_| l.sample()).collect();
        draws.sort();
        let median = draws[2000].as_secs_f64() * 1000.0;
        assert!((15.0..27.0).contains(&median), "median {median} ms");
    }
}
