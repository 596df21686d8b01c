//! The debug log of packet decisions (`bpfLogLevel: Debug`): the TC programs write one
//! `struct mg_log_event` per packet to the ring buffer `mg_log` while the agent has switched it on
//! ([`crate::Dataplane::set_debug_log`]); [`DecisionLog`] reads them and [`LogEvent`] displays
//! each as one line: program, interface, tuple as it arrived, what was done, verdict.

use std::{fmt, net::Ipv4Addr, path::Path};

use aya::maps::{Map, MapData, RingBuf};

use super::{addr_of, names, port_of};
use crate::{Error, TcProgram};

/// Mirrors `struct mg_log_event`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LogEvent {
    /// host: `bpf_ktime_get_ns()`.
    pub ts_ns: u64,
    /// host: the interface the program ran on.
    pub ifindex: u32,
    /// host: the program, an index into [`TcProgram::ALL`].
    pub hook: u8,
    pub proto: u8,
    /// The TC verdict.
    pub verdict: u8,
    pub pad: u8,
    /// be: as it arrived.
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    /// be: as it left.
    pub out_saddr: u32,
    pub out_daddr: u32,
    pub out_sport: u16,
    pub out_dport: u16,
    /// be: the node it came from in the tunnel, 0 if not.
    pub tun_src: u32,
}

impl LogEvent {
    /// The program that decided.
    pub fn program(&self) -> Option<TcProgram> {
        TcProgram::ALL.get(usize::from(self.hook)).copied()
    }

    pub fn src(&self) -> (Ipv4Addr, u16) {
        (addr_of(self.saddr), port_of(self.sport))
    }

    pub fn dst(&self) -> (Ipv4Addr, u16) {
        (addr_of(self.daddr), port_of(self.dport))
    }

    pub fn out_src(&self) -> (Ipv4Addr, u16) {
        (addr_of(self.out_saddr), port_of(self.out_sport))
    }

    pub fn out_dst(&self) -> (Ipv4Addr, u16) {
        (addr_of(self.out_daddr), port_of(self.out_dport))
    }

    /// What was done, in words: "dnat to A:P", "snat to A:P", "drop", "redirect", "pass".
    pub fn decision(&self) -> String {
        let mut parts = Vec::new();
        if self.tun_src != 0 {
            parts.push(format!("from the tunnel ({})", addr_of(self.tun_src)));
        }
        if self.out_dst() != self.dst() {
            let (a, p) = self.out_dst();
            parts.push(format!("dnat to {a}:{p}"));
        }
        if self.out_src() != self.src() {
            let (a, p) = self.out_src();
            parts.push(format!("snat to {a}:{p}"));
        }
        parts.push(
            match u32::from(self.verdict) {
                crate::TC_ACT_OK => "pass",
                crate::TC_ACT_SHOT => "drop",
                crate::TC_ACT_REDIRECT => "redirect",
                _ => "other verdict",
            }
            .to_owned(),
        );
        parts.join(", ")
    }
}

impl fmt::Display for LogEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let prog = self.program().map_or("mg_?", TcProgram::name);
        let proto = match self.proto {
            6 => "tcp",
            17 => "udp",
            1 => "icmp",
            _ => "ip",
        };
        let ((sa, sp), (da, dp)) = (self.src(), self.dst());
        write!(
            f,
            "{prog} if={} {proto} {sa}:{sp} -> {da}:{dp}: {}",
            self.ifindex,
            self.decision()
        )
    }
}

/// The reader of `mg_log`, opened from its pin (the agent's log thread, tests).
pub struct DecisionLog {
    ring: RingBuf<MapData>,
}

impl fmt::Debug for DecisionLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DecisionLog").finish_non_exhaustive()
    }
}

impl DecisionLog {
    /// Opens `mg_log` pinned in `pin_dir` (created by [`crate::Dataplane::load`]).
    pub fn open(pin_dir: &Path) -> Result<Self, Error> {
        let name = names::LOG;
        let data =
            MapData::from_pin(pin_dir.join(name)).map_err(|source| Error::Map { name, source })?;
        let map = Map::from_map_data(data).map_err(|source| Error::Map { name, source })?;
        let ring = RingBuf::try_from(map).map_err(|source| Error::Map { name, source })?;
        Ok(Self { ring })
    }

    /// Every event written since the last call (none when the log is off).
    pub fn drain(&mut self) -> Vec<LogEvent> {
        let mut out = Vec::new();
        while let Some(item) = self.ring.next() {
            if item.len() >= size_of::<LogEvent>() {
                // SAFETY: LogEvent is a #[repr(C)] struct of integers (every bit pattern valid,
                // layout checked against the C by tests/layout.rs) and the item holds at least
                // its size; read_unaligned makes no alignment assumption.
                #[expect(unsafe_code, reason = "reading a C struct out of the ring buffer")]
                let e = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<LogEvent>()) };
                out.push(e);
            }
        }
        out
    }
}
