//! The userspace tunnel: boringtun's `device` (the WireGuard protocol, its timers and its
//! sockets, in threads of the agent) over a TUN interface, configured through the WireGuard
//! configuration protocol (UAPI: `set=1` / `get=1` text, as `wg` speaks to wireguard-go).
//!
//! - The interface is a *persistent* multi-queue TUN made with `ip tuntap` before boringtun
//!   attaches to it, so its MTU can be set first (boringtun sizes its reads by the MTU it finds
//!   at start) and so it outlives an agent restart with its routes, like a kernel WireGuard
//!   device: while no agent runs, packets routed into it are dropped, never sent in the clear.
//!   Turning WireGuard off deletes it.
//! - The UAPI channel is one end of a socket pair handed to boringtun (`uapi_fd`), not the
//!   `/var/run/wireguard/<name>.sock` file: every node of a lab shares that directory and the
//!   interface name. With `uapi_fd` boringtun also installs no SIGINT/SIGTERM handlers (they
//!   would take the agent's signals) and exits when our end is closed.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::IntoRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use boringtun::device::{DeviceConfig, DeviceHandle};

use super::ip;

/// boringtun's worker threads (each with its own TUN queue). The lab runs three agents on two
/// cores.
const THREADS: usize = 2;

/// How long a configuration request may take before the device is considered stuck.
const UAPI_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Userspace {
    name: String,
    mtu: u32,
    connected: bool,
    uapi: BufReader<UnixStream>,
    // Dropped after `uapi` (fields drop in order): closing our end first makes boringtun's
    // threads exit.
    _handle: DeviceHandle,
}

impl std::fmt::Debug for Userspace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Userspace")
            .field("name", &self.name)
            .field("mtu", &self.mtu)
            .field("connected", &self.connected)
            .finish_non_exhaustive()
    }
}

impl Userspace {
    /// Makes (or adopts, after a restart) the TUN interface `name` with `mtu` and starts
    /// boringtun on it. An interface of that name that is not a TUN is not ours: refused.
    ///
    /// `connected`: one connected UDP socket per peer (no route lookup per packet). Not with
    /// host encryption: boringtun marks a connected socket only after `connect`, which has by
    /// then picked the tunnel's address as the source (the peer's own address is routed into
    /// the tunnel); the shared, marked socket looks the route up per packet with the mark.
    pub async fn create(name: &str, mtu: u32, connected: bool) -> Result<Userspace> {
        match ip::link_kind(name).await? {
            None => ip::batch(&[format!("tuntap add dev {name} mode tun multi_queue")])
                .await
                .context("cannot create the TUN interface")?,
            Some(kind) if kind == "tun" => {}
            Some(kind) => bail!(
                "an interface named {name} exists and is {}, not a TUN device this agent made",
                if kind.is_empty() {
                    "a plain device".to_owned()
                } else {
                    format!("of kind {kind}")
                }
            ),
        }
        ip::batch(&[format!("link set dev {name} mtu {mtu}")]).await?;
        let (ours, theirs) = UnixStream::pair().context("cannot make the UAPI socket pair")?;
        let config = DeviceConfig {
            n_threads: THREADS,
            use_connected_socket: connected,
            use_multi_queue: true,
            uapi_fd: theirs.into_raw_fd(),
        };
        let handle = DeviceHandle::new(name, config)
            .map_err(|e| anyhow::anyhow!("boringtun cannot start on {name}: {e}"))?;
        ours.set_read_timeout(Some(UAPI_TIMEOUT))?;
        ours.set_write_timeout(Some(UAPI_TIMEOUT))?;
        Ok(Userspace {
            name: name.to_owned(),
            mtu,
            connected,
            uapi: BufReader::new(ours),
            _handle: handle,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn mtu(&self) -> u32 {
        self.mtu
    }

    pub fn connected(&self) -> bool {
        self.connected
    }

    /// Sends one UAPI request and returns the lines of the answer (without `errno=0`).
    /// The exchange takes microseconds (a socket pair to boringtun's threads), so it is done
    /// in place rather than on a blocking thread.
    pub fn request(&mut self, text: &str) -> Result<Vec<String>> {
        self.uapi
            .get_mut()
            .write_all(text.as_bytes())
            .context("cannot write to the WireGuard device")?;
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            let n = self
                .uapi
                .read_line(&mut line)
                .context("no answer from the WireGuard device")?;
            if n == 0 {
                bail!("the WireGuard device closed its configuration channel");
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some(errno) = line.strip_prefix("errno=") {
                if errno != "0" {
                    bail!(
                        "the WireGuard device refused {:?}: errno {errno}",
                        text.lines().nth(1).unwrap_or_default()
                    );
                }
                continue;
            }
            lines.push(line.to_owned());
        }
        Ok(lines)
    }
}
