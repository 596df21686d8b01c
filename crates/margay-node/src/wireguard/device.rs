//! The tunnel device: the kernel's WireGuard where it exists ([`Kernel`]), else the userspace
//! tunnel.
//!
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
use super::kernel::Kernel;
use super::key::KeyPair;
use super::plan::{self, Peer};

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

/// The tunnel this node runs: the kernel's WireGuard where the kernel has it, boringtun
/// otherwise (item 1 of Calico's behaviour: Felix needs the module; we fall back instead of
/// running without encryption).
#[derive(Debug)]
pub struct Device {
    tunnel: Tunnel,
    /// Whether userspace sockets are connected (see [`Userspace::create`]); kept for the
    /// kernel device too, so a change of the setting is noticed alike.
    connected: bool,
    /// Which implementation runs and why, for the log and `status.dataplane.wireguardDevice`.
    implementation: String,
}

#[derive(Debug)]
enum Tunnel {
    Kernel(Kernel),
    Userspace(Userspace),
}

impl Device {
    /// Makes (or adopts, after a restart) the interface `name` with `mtu`: the kernel's
    /// WireGuard when `ip link add ... type wireguard` and its netlink family work in this
    /// namespace, else boringtun over a TUN (the reason is kept in [`Self::implementation`]).
    /// A TUN left by an earlier run is adopted as it is; an interface of another kind with the
    /// name is not ours: refused.
    pub async fn create(name: &str, mtu: u32, connected: bool) -> Result<Device> {
        let existing = ip::link_kind(name).await?;
        let (tunnel, implementation) = match existing.as_deref() {
            Some("wireguard") => (
                Tunnel::Kernel(Kernel::create(name, mtu, true).await?),
                "kernel".to_owned(),
            ),
            Some("tun") => (
                Tunnel::Userspace(Userspace::create(name, mtu, connected).await?),
                "userspace (boringtun over TUN), the device of an earlier run of the agent"
                    .to_owned(),
            ),
            Some(_) => (
                // Refused there with the interface's kind.
                Tunnel::Userspace(Userspace::create(name, mtu, connected).await?),
                String::new(),
            ),
            None => match Kernel::create(name, mtu, false).await {
                Ok(kernel) => (Tunnel::Kernel(kernel), "kernel".to_owned()),
                Err(refused) => {
                    let why = format!("{refused:#}");
                    tracing::info!(interface = %name, reason = %why, "no kernel WireGuard here: falling back to userspace WireGuard (boringtun)");
                    (
                        Tunnel::Userspace(Userspace::create(name, mtu, connected).await?),
                        format!("userspace (boringtun over TUN): {}", kernel_refusal(&why)),
                    )
                }
            },
        };
        Ok(Device {
            tunnel,
            connected,
            implementation,
        })
    }

    pub fn name(&self) -> &str {
        match &self.tunnel {
            Tunnel::Kernel(k) => k.name(),
            Tunnel::Userspace(u) => u.name(),
        }
    }

    pub fn mtu(&self) -> u32 {
        match &self.tunnel {
            Tunnel::Kernel(k) => k.mtu(),
            Tunnel::Userspace(u) => u.mtu(),
        }
    }

    pub fn connected(&self) -> bool {
        self.connected
    }

    /// `kernel`, or `userspace (boringtun over TUN): <why not the kernel>`.
    pub fn implementation(&self) -> &str {
        &self.implementation
    }

    /// Sets the private key, the port and the mark; removes every peer.
    pub async fn configure(&mut self, secret: &KeyPair, port: u16, fwmark: u32) -> Result<()> {
        match &mut self.tunnel {
            Tunnel::Kernel(k) => k.configure(secret.secret(), port, fwmark).await,
            Tunnel::Userspace(u) => u
                .request(&plan::uapi_device(&secret.secret_hex(), port, fwmark))
                .map(drop),
        }
    }

    pub async fn set_port(&mut self, port: u16) -> Result<()> {
        match &mut self.tunnel {
            Tunnel::Kernel(k) => k.set_port(port).await,
            Tunnel::Userspace(u) => u
                .request(&format!("set=1\nlisten_port={port}\n\n"))
                .map(drop),
        }
    }

    pub async fn add_peer(&mut self, peer: &Peer) -> Result<()> {
        match &mut self.tunnel {
            Tunnel::Kernel(k) => k.add_peer(peer).await,
            Tunnel::Userspace(u) => {
                let text = plan::uapi_add_peer(peer)
                    .ok_or_else(|| anyhow::anyhow!("{}'s key is not a WireGuard key", peer.node))?;
                u.request(&text).map(drop)
            }
        }
    }

    pub async fn remove_peer(&mut self, public_key: &str) -> Result<()> {
        match &mut self.tunnel {
            Tunnel::Kernel(k) => k.remove_peer(public_key).await,
            Tunnel::Userspace(u) => match plan::uapi_remove_peer(public_key) {
                Some(text) => u.request(&text).map(drop),
                None => Ok(()),
            },
        }
    }

    /// Asks the device for its state: an error means it stopped answering.
    pub async fn alive(&mut self) -> Result<()> {
        match &mut self.tunnel {
            Tunnel::Kernel(k) => k.get().await,
            Tunnel::Userspace(u) => u.request("get=1\n\n").map(drop),
        }
    }
}

/// Why the kernel's WireGuard cannot be used, from the error of [`Kernel::create`], short
/// enough for a status line: `ip`'s own words when it refused the link kind.
pub fn kernel_refusal(error: &str) -> String {
    if error.contains("Unknown device type") {
        "this kernel has no WireGuard (ip link add ... type wireguard: Unknown device type)".into()
    } else {
        format!("the kernel's WireGuard cannot be used ({error})")
    }
}
