//! Template definitions as the management API returns them: what the registry stores, the Cloud
//! API edge reads, and the parameter check (`policy::template`) checks a send against.

use serde::{Deserialize, Serialize};

use super::Category;

/// One template in one language, from `GET /{waba_id}/message_templates` (unknown fields are
/// ignored: Meta adds fields over time).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateDefinition {
    /// Name.
    pub name: String,
    /// Exact locale, e.g. `en_US`.
    pub language: String,
    /// `APPROVED`, `PAUSED`, …
    pub status: String,
    /// `MARKETING`, `UTILITY` or `AUTHENTICATION`.
    pub category: String,
    /// `POSITIONAL` (default) or `NAMED`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameter_format: Option<String>,
    /// Header, body, footer, buttons.
    #[serde(default)]
    pub components: Vec<DefinitionComponent>,
}

/// One component of a definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DefinitionComponent {
    /// `HEADER`, `BODY`, `FOOTER`, `BUTTONS`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Header format: `TEXT`, `IMAGE`, `VIDEO`, `DOCUMENT`, `LOCATION`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// Text with `{{1}}` or `{{name}}` placeholders.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Buttons, in order (their index is what a send addresses).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub buttons: Vec<DefinitionButton>,
}

/// One button of a definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DefinitionButton {
    /// `QUICK_REPLY`, `URL`, `PHONE_NUMBER`, `OTP`, `COPY_CODE`, …
    #[serde(rename = "type")]
    pub kind: String,
    /// A URL button's URL; a `{{1}}` in it makes the button take a parameter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

impl TemplateDefinition {
    /// The registry's category, if Meta's name is one wa-sender knows.
    pub fn category(&self) -> Option<Category> {
        Category::parse(&self.category)
    }
}
