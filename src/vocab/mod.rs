//! The shared vocabulary, at the bottom of the crate: dead-letter reasons, deferral causes,
//! lanes and delivery modes, message categories, the Cloud API's error codes and where an error
//! was found, template definitions and a status's pricing object. Plain data with its wire
//! names; it imports nothing else from the crate, so every module may use it without importing
//! the others. The types are also re-exported where they are used most (`event::DeadReason`,
//! `pipeline::DeferCause`, `job::Lane`, `cloud::ErrorCode`,
//! `policy::template::TemplateDefinition`, `webhook::payload::Pricing`).

mod category;
mod defer;
mod error;
mod lane;
mod pricing;
mod reason;
mod template;

pub use category::Category;
pub use defer::DeferCause;
pub use error::{ErrorCode, ErrorSource};
pub use lane::{DeliveryMode, Lane};
pub use pricing::Pricing;
pub use reason::DeadReason;
pub use template::{DefinitionButton, DefinitionComponent, TemplateDefinition};
