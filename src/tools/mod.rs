//! Operator tools that run beside the gateway, not inside its request path: the demo origin
//! (`aisle demo`), the operator CLI (`aisle purge`, `stats`, ...), the hit-ratio replay (`aisle replay`) and the synthetic trace generator
//! (`aisle trace`). They sit at the top of the layering: they use the gateway's own modules
//! (replay calls [`crate::admission`], the same decisions the proxy makes) and nothing uses them.

pub mod cli;
pub mod demo;
pub mod replay;
pub mod tracegen;
