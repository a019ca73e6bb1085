//! dpc-bench: the operator's release binary, as its own process, against the Kubernetes API
//! emulator and the DPC simulator over real HTTP. `bench` measures convergence and quiet
//! behaviour; `soak` injects faults and kills and checks nothing was lost.

pub mod bench;
pub mod soak;
