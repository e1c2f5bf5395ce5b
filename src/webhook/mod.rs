//! Meta's webhooks: the HTTP receiver ([`receiver`]) verifies each POST's signature and lands the
//! raw body, publisher-confirmed, in `wa.webhooks.intake` before answering 200; the processor
//! turns what it holds into events and store changes ([`account`] decides what an
//! `account_update` does to sending).

pub mod account;
pub mod payload;
pub mod processor;
pub mod receiver;
pub mod status;
