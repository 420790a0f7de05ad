//! The allocator core: pure logic, no I/O, no async, no clocks of its own.
//!
//! Callers feed it what the replicated log decided (applied ceilings, leader
//! changes) and the current time, and get back outcomes to act on (ranges to
//! return, refills to propose). That keeps every rule here testable in
//! microseconds.

pub mod clock;
pub mod keymap;
pub mod segment;
pub mod snowflake;
pub mod types;

pub use clock::{Clock, SystemClock};
pub use segment::{AllocError, Allocation, Allocator, CeilingSource, DenseRaise, Release, Role};
pub use snowflake::{ClockReport, ForwardStep, IdError, Issuer, Layout, LayoutError};
pub use types::{
    InvalidArgument, Mode, NamespaceId, NamespaceSpec, Namespaces, RequestId, SeqKey, SeqRange,
    MAX_SEQUENCE,
};
