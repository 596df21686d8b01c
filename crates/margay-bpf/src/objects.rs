//! The BPF objects compiled from `bpf/progs/*.c` by `build.rs`, embedded in the binary.

/// `bpf/progs/tc.c`: the TC programs (see [`crate::TcProgram`]).
pub static TC: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tc.o"));

/// `bpf/progs/connect_balancer.c`: the cgroup sock_addr programs (see [`crate::CgroupProgram`]).
pub static CONNECT_BALANCER: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/connect_balancer.o"));

/// Every embedded object with its source file name, for checks that go over all of them.
pub static ALL: [(&str, &[u8]); 2] = [("tc.c", TC), ("connect_balancer.c", CONNECT_BALANCER)];
