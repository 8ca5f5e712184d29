//! The standing attack suite (issue 9): what an attacker tries against the real binary, with an
//! origin that behaves like common web frameworks (`harness::hostile`). One module per area:
//! each keeps the cases that once got through as regression tests, and the ones that held up.

mod exhaustion;
mod held_up;
mod identity;
mod panics;
mod trust;
