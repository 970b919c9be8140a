//! Sagas: a business transaction spread over services, each step a local transaction
//! there, undone by a compensating step when a later one fails.
//!
//! - [`machine`]: the orchestrator's state machine, pure (every input takes `now`):
//!   replies move a saga forward, a failure or a step that keeps timing out turns it
//!   into compensation in reverse, and each transition says what to send.
//! - [`store`]: the durable orchestrator: each transition one transaction in the
//!   host's database (state, history, the command through its outbox, the host's
//!   reaction to an ended saga); a timer retries what went unanswered, which is also
//!   what resumes sagas after a crash.
//!
//! Nothing here knows the shop: a [`machine::Definition`] names the steps, and the
//! host service turns each [`machine::Command`] into the event it publishes.
#![forbid(unsafe_code)]

pub mod machine;
pub mod store;
