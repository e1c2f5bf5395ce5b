//! Message categories: a job's hint, a template's category in the registry.

use serde::{Deserialize, Serialize};

/// Message category hint; for templates the template registry's category wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum Category {
    Authentication,
    Utility,
    Marketing,
    Service,
}

impl Category {
    /// The wire name (`marketing`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Category::Authentication => "authentication",
            Category::Utility => "utility",
            Category::Marketing => "marketing",
            Category::Service => "service",
        }
    }

    /// Parses Meta's template category (`MARKETING`, `UTILITY`, `AUTHENTICATION`), any case.
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "authentication" => Some(Category::Authentication),
            "utility" => Some(Category::Utility),
            "marketing" => Some(Category::Marketing),
            "service" => Some(Category::Service),
            _ => None,
        }
    }
}
