//! What the essay platform's services share: the event contract with the original system
//! ([`contract`]) and the runtime that runs a service on the outbox ([`runtime`]).
//!
//! Services depend on this crate and on `outbox`; neither depends on a service.

pub mod content;
pub mod contract;
pub mod http;
pub mod identity;
pub mod local;
pub mod original;
pub mod prepared;
pub mod runtime;
pub mod trace;
pub mod util;
pub mod wire;

pub use contract::{topics, Envelope, EventFactory};
pub use runtime::{Service, Shutdown};
