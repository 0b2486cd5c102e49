//! One process, many VMs: a [`Host`] serves a device per VM, each on its own vfio-user socket
//! with its own MAC (so its own GIDs) and limits, all attached to one emulated RDMA fabric.
//!
//! ```text
//!   QEMU vm1 ── vm1.sock ── thread vfio-user:vm1 ── device vm1.N (main loop, workers) ─┐
//!   QEMU vm2 ── vm2.sock ── thread vfio-user:vm2 ── device vm2.N (main loop, workers) ─┼─ Fabric
//!   …                                                                                  ┘
//! ```
//! Each device keeps its own server thread, main loop, worker pool, tables and limits, so a VM
//! that floods its queues or stops polling occupies its own threads only; the kernel's scheduler
//! shares the cores between them. What the devices share is the fabric (GID routing and the
//! retry timer). A VM that disconnects, reconnects or resets its device touches only its own
//! device; the other VMs' QPs connected to it see their peer gone (transport retries, then
//! `RETRY_EXC_ERR`), as on a real network.
//!
//! Devices are added and removed while the process runs ([`Host::add`], [`Host::remove`],
//! [`Host::apply`] for a whole new set, which is what `pvrdma serve` does on SIGHUP with its
//! configuration file).

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pvrdma_dev::DeviceConfig;
use rdma_backend::emulated::Fabric;

use crate::{lock, BackendChoice, Error, Result, RunningServer, ServeOptions};

/// Devices one process serves by default ([`HostLimits::max_devices`]).
pub const DEFAULT_MAX_DEVICES: usize = 64;

/// The most devices a process may be configured for: each costs a server thread, a main loop
/// and its workers (at least three threads), and every VM on one host shares its cores.
pub const MAX_DEVICES: usize = 1024;

/// Process-wide limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostLimits {
    /// Devices served at once (1..=[`MAX_DEVICES`]).
    pub max_devices: usize,
    /// Host memory, in bytes, the devices' budgets ([`DeviceConfig::max_host_mem`]) may add up
    /// to: what all guests together can make the process hold.
    pub max_memory: u64,
}

impl Default for HostLimits {
    fn default() -> Self {
        HostLimits {
            max_devices: DEFAULT_MAX_DEVICES,
            max_memory: default_max_memory(),
        }
    }
}

/// Half of the host's RAM (`MemTotal` of `/proc/meminfo`; 8 GiB if it cannot be read): the
/// default of [`HostLimits::max_memory`].
pub fn default_max_memory() -> u64 {
    let total_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    });
    total_kib.map_or(8 << 30, |k| (k << 10) / 2)
}

/// The devices' budgets added up.
fn budgets<'a>(configs: impl Iterator<Item = &'a DeviceConfig>) -> u64 {
    configs.map(|c| c.max_host_mem).fold(0, u64::saturating_add)
}

/// One device of a host: where its VM connects and what it gets.
#[derive(Debug)]
pub struct DeviceSpec {
    /// Name in logs and thread names; unique in the host.
    pub name: String,
    /// Socket path; unique in the host. Ignored when `listen_fd` is set.
    pub socket: PathBuf,
    /// An already listening socket (socket activation) instead of `socket`.
    pub listen_fd: Option<OwnedFd>,
    /// The device each client of this socket gets; its MAC is unique in the host.
    pub device: DeviceConfig,
}

impl DeviceSpec {
    /// A device on `socket`, named after the socket file (`/run/pvrdma/vm1.sock` → `vm1`).
    pub fn new(socket: impl Into<PathBuf>, device: DeviceConfig) -> DeviceSpec {
        let socket = socket.into();
        DeviceSpec {
            name: default_name(&socket),
            socket,
            listen_fd: None,
            device,
        }
    }
}

/// The name of a device on `socket` when none is given: the file name without its extension.
pub fn default_name(socket: &Path) -> String {
    socket
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "pvrdma".into())
}

/// What a host says about one of its devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Its name.
    pub name: String,
    /// Its socket path (empty for an inherited socket).
    pub socket: PathBuf,
    /// Its MAC.
    pub mac: [u8; 6],
}

/// What [`Host::apply`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Devices started.
    pub added: Vec<String>,
    /// Devices stopped.
    pub removed: Vec<String>,
    /// Devices whose next client gets a new configuration.
    pub updated: Vec<String>,
}

/// Who declared a device: the configuration ([`Host::apply`] manages it) or an operator at run
/// time ([`Host::add`], e.g. over the control socket; [`Host::apply`] leaves it alone).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Origin {
    /// The command line or the configuration file.
    Config,
    /// Added while the process runs.
    Runtime,
}

/// A device's state, as the control socket and the metrics report it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceStatus {
    /// Its name.
    pub name: String,
    /// Its socket path (empty for an inherited socket).
    pub socket: PathBuf,
    /// Its MAC, `xx:xx:xx:xx:xx:xx`.
    pub mac: String,
    /// The backend its devices use.
    pub backend: String,
    /// Whether a client (a VMM) is connected now.
    pub connected: bool,
    /// Clients accepted since the device was added.
    pub clients: u64,
    /// Who declared it.
    pub origin: Origin,
    /// The RoCE version it offers.
    pub roce_version: u8,
    /// Its limits: QPs, CQs, MRs, and the host memory its guest may make the process hold.
    pub max_qp: u32,
    /// CQs.
    pub max_cq: u32,
    /// MRs.
    pub max_mr: u32,
    /// Bytes.
    pub max_host_mem: u64,
}

struct Hosted {
    name: String,
    socket: PathBuf,
    config: DeviceConfig,
    origin: Origin,
    server: RunningServer,
}

/// Many devices on one fabric, each served on its own socket and thread.
pub struct Host {
    fabric: Arc<Fabric>,
    backend: BackendChoice,
    limits: HostLimits,
    devices: Mutex<Vec<Hosted>>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("devices", &lock(&self.devices).len())
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// How long [`Host::remove`] and [`Host::apply`] wait for an idle server thread to end.
const REMOVE_GRACE: Duration = Duration::from_millis(200);

fn mac_str(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Why `spec` cannot join devices `others` (name, socket, MAC) under `limits`, if it cannot.
fn conflict<'a>(
    spec: &DeviceSpec,
    mut others: impl Iterator<Item = (&'a str, &'a Path, &'a [u8; 6])>,
) -> Option<String> {
    if let Err(e) = spec.device.validate() {
        return Some(e.to_string());
    }
    others.find_map(|(name, socket, mac)| {
        if name == spec.name {
            Some("a device of that name exists".to_string())
        } else if spec.listen_fd.is_none()
            && !socket.as_os_str().is_empty()
            && socket == spec.socket
        {
            Some(format!("device `{name}` listens on {}", socket.display()))
        } else if *mac == spec.device.mac {
            Some(format!(
                "device `{name}` has MAC {} (its GIDs would collide)",
                mac_str(mac)
            ))
        } else {
            None
        }
    })
}

impl Host {
    /// An empty host with a fresh fabric; every device it serves uses `backend`.
    pub fn new(backend: BackendChoice, limits: HostLimits) -> Result<Host> {
        if !(1..=MAX_DEVICES).contains(&limits.max_devices) {
            return Err(Error::Limit(format!(
                "max-devices must be 1..={MAX_DEVICES}"
            )));
        }
        Ok(Host {
            fabric: Fabric::new(),
            backend,
            limits,
            devices: Mutex::new(Vec::new()),
        })
    }

    /// The fabric the devices share.
    pub fn fabric(&self) -> &Arc<Fabric> {
        &self.fabric
    }

    /// The limits.
    pub fn limits(&self) -> HostLimits {
        self.limits
    }

    /// Starts serving `spec`. Refused if the host is full, or the name, socket or MAC is taken.
    /// The device belongs to the configuration: [`Host::apply`] removes it when a new set does
    /// not name it.
    pub fn add(&self, spec: DeviceSpec) -> Result<()> {
        let mut devs = lock(&self.devices);
        self.add_locked(&mut devs, spec, Origin::Config)
    }

    /// Starts serving `spec` as [`Host::add`] does, as a device added at run time: kept by
    /// [`Host::apply`] unless the new set names it.
    pub fn add_at_runtime(&self, spec: DeviceSpec) -> Result<()> {
        let mut devs = lock(&self.devices);
        self.add_locked(&mut devs, spec, Origin::Runtime)
    }

    fn add_locked(&self, devs: &mut Vec<Hosted>, spec: DeviceSpec, origin: Origin) -> Result<()> {
        let refuse = |why: String| Error::Refused {
            name: spec.name.clone(),
            why,
        };
        if devs.len() >= self.limits.max_devices {
            return Err(refuse(format!(
                "the process serves its maximum of {} devices",
                self.limits.max_devices
            )));
        }
        let taken = budgets(devs.iter().map(|d| &d.config));
        if taken.saturating_add(spec.device.max_host_mem) > self.limits.max_memory {
            return Err(refuse(format!(
                "its host-memory budget of {} MiB and the other devices' {} MiB pass the \
                 process's max-memory of {} MiB",
                spec.device.max_host_mem >> 20,
                taken >> 20,
                self.limits.max_memory >> 20
            )));
        }
        let others = devs
            .iter()
            .map(|d| (d.name.as_str(), d.socket.as_path(), &d.config.mac));
        if let Some(why) = conflict(&spec, others).or_else(|| self.backend_refuses(&spec.device)) {
            return Err(refuse(why));
        }
        let socket = if spec.listen_fd.is_some() {
            PathBuf::new()
        } else {
            spec.socket.clone()
        };
        let (name, config) = (spec.name.clone(), spec.device.clone());
        let opts = ServeOptions {
            name: spec.name,
            socket: spec.socket,
            listen_fd: spec.listen_fd,
            device: spec.device,
            backend: self.backend.clone(),
        };
        let server = RunningServer::spawn_on(opts, self.fabric.clone())?;
        log::info!(
            "device {name}: MAC {} on {}",
            mac_str(&config.mac),
            if socket.as_os_str().is_empty() {
                "an inherited socket".to_string()
            } else {
                socket.display().to_string()
            }
        );
        devs.push(Hosted {
            name,
            socket,
            config,
            origin,
            server,
        });
        Ok(())
    }

    /// Why the backend cannot serve a device configured as `d` (rdma-core: the host port has
    /// no GID of the device's RoCE version, so its guest could bind none).
    fn backend_refuses(&self, d: &DeviceConfig) -> Option<String> {
        match &self.backend {
            BackendChoice::Emulated => None,
            BackendChoice::RdmaCore(cfg) => {
                let ty = if d.roce_version == 2 {
                    rdma_backend::GidType::RoceV2
                } else {
                    rdma_backend::GidType::RoceV1
                };
                rdma_backend::rdma_core::check_gid_type(cfg, ty)
                    .err()
                    .map(|e| e.to_string())
            }
        }
    }

    /// Stops serving the device `name`: its socket is removed, a connected client's connection
    /// is closed and its device shut down. `false` if there is no such device.
    pub fn remove(&self, name: &str) -> bool {
        let hosted = {
            let mut devs = lock(&self.devices);
            let Some(i) = devs.iter().position(|d| d.name == name) else {
                return false;
            };
            devs.remove(i)
        };
        stop_all(vec![hosted], REMOVE_GRACE);
        true
    }

    /// Makes the host serve exactly `specs` (matched to the running devices by name) besides
    /// the devices added at run time that `specs` does not name: configured devices not named
    /// are removed, new ones added, a changed socket restarts its device, and any other change
    /// reaches the device's next client. The whole set is checked first (with the run-time
    /// devices it keeps); if any device is refused, nothing changes.
    pub fn apply(&self, specs: Vec<DeviceSpec>) -> Result<Changes> {
        let mut devs = lock(&self.devices);
        let kept: Vec<&Hosted> = devs
            .iter()
            .filter(|d| d.origin == Origin::Runtime && !specs.iter().any(|s| s.name == d.name))
            .collect();
        if specs.len() + kept.len() > self.limits.max_devices {
            return Err(Error::Limit(format!(
                "{} devices asked for and {} added at run time, the process serves at most {} \
                 (max-devices)",
                specs.len(),
                kept.len(),
                self.limits.max_devices
            )));
        }
        let total = budgets(
            specs
                .iter()
                .map(|s| &s.device)
                .chain(kept.iter().map(|d| &d.config)),
        );
        if total > self.limits.max_memory {
            return Err(Error::Limit(format!(
                "the devices' host-memory budgets add up to {} MiB, the process's max-memory is \
                 {} MiB",
                total >> 20,
                self.limits.max_memory >> 20
            )));
        }
        for (i, s) in specs.iter().enumerate() {
            let others = specs[..i]
                .iter()
                .map(|o| (o.name.as_str(), o.socket.as_path(), &o.device.mac))
                .chain(
                    kept.iter()
                        .map(|d| (d.name.as_str(), d.socket.as_path(), &d.config.mac)),
                );
            if let Some(why) = conflict(s, others).or_else(|| self.backend_refuses(&s.device)) {
                return Err(Error::Refused {
                    name: s.name.clone(),
                    why,
                });
            }
        }
        let mut changes = Changes::default();
        let mut gone = Vec::new();
        let mut i = 0;
        while i < devs.len() {
            let d = &devs[i];
            let named = specs.iter().any(|s| s.name == d.name);
            let keep = (d.origin == Origin::Runtime && !named)
                || specs
                    .iter()
                    .any(|s| s.name == d.name && s.listen_fd.is_none() && s.socket == d.socket);
            if keep {
                i += 1;
            } else {
                changes.removed.push(d.name.clone());
                gone.push(devs.remove(i));
            }
        }
        // Stopped before the new ones start, so that a socket path or MAC can move between
        // devices in one reload.
        stop_all(gone, REMOVE_GRACE);
        let mut failed = None;
        for s in specs {
            if let Some(d) = devs.iter_mut().find(|d| d.name == s.name) {
                d.origin = Origin::Config;
                if d.config != s.device {
                    d.server.set_config(s.device.clone());
                    d.config = s.device;
                    changes.updated.push(d.name.clone());
                }
                continue;
            }
            let name = s.name.clone();
            match self.add_locked(&mut devs, s, Origin::Config) {
                Ok(()) => changes.added.push(name),
                Err(e) => {
                    log::error!("{e}");
                    failed.get_or_insert(e);
                }
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(changes),
        }
    }

    /// The devices, in the order they were added.
    pub fn devices(&self) -> Vec<DeviceInfo> {
        lock(&self.devices)
            .iter()
            .map(|d| DeviceInfo {
                name: d.name.clone(),
                socket: d.socket.clone(),
                mac: d.config.mac,
            })
            .collect()
    }

    /// Every device's state, in the order they were added.
    pub fn status(&self) -> Vec<DeviceStatus> {
        let backend = self.backend.describe();
        lock(&self.devices)
            .iter()
            .map(|d| DeviceStatus {
                name: d.name.clone(),
                socket: d.socket.clone(),
                mac: mac_str(&d.config.mac),
                backend: backend.clone(),
                connected: d.server.stopper().connected(),
                clients: d.server.stopper().clients(),
                origin: d.origin,
                roce_version: d.config.roce_version,
                max_qp: d.config.max_qp,
                max_cq: d.config.max_cq,
                max_mr: d.config.max_mr,
                max_host_mem: d.config.max_host_mem,
            })
            .collect()
    }

    /// The device `name` serves its connected client, or will serve the next one, if any.
    pub fn device(&self, name: &str) -> Option<pvrdma_dev::DeviceHandle> {
        lock(&self.devices)
            .iter()
            .find(|d| d.name == name)
            .and_then(|d| d.server.stopper().current_device())
    }

    /// Takes out the devices whose server thread ended by itself (it could not start a device
    /// for a client) and returns their names with why; the others go on.
    pub fn reap(&self) -> Vec<(String, Error)> {
        let ended: Vec<Hosted> = {
            let mut devs = lock(&self.devices);
            let (ended, live) = std::mem::take(&mut *devs)
                .into_iter()
                .partition(|d| d.server.is_finished());
            *devs = live;
            ended
        };
        ended
            .into_iter()
            .filter_map(|d| {
                let name = d.name.clone();
                d.server.stop(Duration::ZERO).err().map(|e| (name, e))
            })
            .collect()
    }

    /// Stops every device: each stops accepting at once, and the whole host waits at most
    /// `grace` for their clients to go before shutting the remaining devices down.
    pub fn stop(&self, grace: Duration) {
        let all = std::mem::take(&mut *lock(&self.devices));
        stop_all(all, grace);
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.stop(Duration::ZERO);
    }
}

/// Stops `servers` together within one `grace`.
fn stop_all(servers: Vec<Hosted>, grace: Duration) {
    for d in &servers {
        d.server.stopper().stop();
    }
    let deadline = Instant::now() + grace;
    for d in servers {
        let left = deadline.saturating_duration_since(Instant::now());
        if let Err(e) = d.server.stop(left) {
            log::warn!("device {}: {e}", d.name);
        }
        log::info!("device {}: stopped", d.name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(last: u8) -> DeviceConfig {
        DeviceConfig {
            mac: [0x52, 0x54, 0, 0, 0, last],
            max_qp: 16,
            max_cq: 16,
            workers: 1,
            ..DeviceConfig::default()
        }
    }

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("pvrdma-host-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn devices_are_added_refused_and_removed() {
        let d = dir("add");
        let host = Host::new(
            BackendChoice::Emulated,
            HostLimits {
                max_devices: 2,
                ..HostLimits::default()
            },
        )
        .unwrap();
        host.add(DeviceSpec::new(d.join("a.sock"), cfg(1))).unwrap();
        // Same socket, same MAC, same name: each refused with its reason.
        let e = host.add(DeviceSpec::new(d.join("a.sock"), cfg(2)));
        assert!(matches!(e, Err(Error::Refused { .. })), "{e:?}");
        let e = host
            .add(DeviceSpec::new(d.join("b.sock"), cfg(1)))
            .unwrap_err();
        assert!(e.to_string().contains("MAC"), "{e}");
        let mut s = DeviceSpec::new(d.join("c.sock"), cfg(3));
        s.name = "a".into();
        assert!(host.add(s).unwrap_err().to_string().contains("name"));
        // An invalid device configuration is refused before anything is bound.
        let mut bad = cfg(4);
        bad.max_qp = 1;
        assert!(host.add(DeviceSpec::new(d.join("x.sock"), bad)).is_err());
        assert!(!d.join("x.sock").exists());
        host.add(DeviceSpec::new(d.join("b.sock"), cfg(2))).unwrap();
        let e = host
            .add(DeviceSpec::new(d.join("c.sock"), cfg(3)))
            .unwrap_err();
        assert!(e.to_string().contains("maximum of 2"), "{e}");
        let names: Vec<_> = host.devices().into_iter().map(|i| i.name).collect();
        assert_eq!(names, ["a", "b"]);
        assert!(d.join("a.sock").exists() && d.join("b.sock").exists());
        assert!(host.remove("a"));
        assert!(!host.remove("a"));
        assert!(!d.join("a.sock").exists());
        // The freed slot, socket and MAC can be taken again.
        host.add(DeviceSpec::new(d.join("a.sock"), cfg(1))).unwrap();
        host.stop(Duration::from_secs(1));
        assert!(host.devices().is_empty());
        assert!(!d.join("a.sock").exists() && !d.join("b.sock").exists());
        let _ = std::fs::remove_dir_all(&d);
    }

    /// The devices' host-memory budgets add up to at most the process's `max_memory`: a
    /// device past it is refused when added, and a set past it when applied.
    #[test]
    fn the_devices_budgets_stay_within_the_process_memory_limit() {
        let d = dir("memory");
        let limits = HostLimits {
            max_memory: 3 << 20,
            ..HostLimits::default()
        };
        let host = Host::new(BackendChoice::Emulated, limits).unwrap();
        let budget = |last, mib: u64| DeviceConfig {
            max_host_mem: mib << 20,
            ..cfg(last)
        };
        host.add(DeviceSpec::new(d.join("a.sock"), budget(1, 2)))
            .unwrap();
        let e = host
            .add(DeviceSpec::new(d.join("b.sock"), budget(2, 2)))
            .unwrap_err();
        assert!(e.to_string().contains("max-memory"), "{e}");
        assert!(!d.join("b.sock").exists());
        host.add(DeviceSpec::new(d.join("b.sock"), budget(2, 1)))
            .unwrap();
        let e = host
            .apply(vec![
                DeviceSpec::new(d.join("a.sock"), budget(1, 2)),
                DeviceSpec::new(d.join("b.sock"), budget(2, 2)),
            ])
            .unwrap_err();
        assert!(e.to_string().contains("max-memory"), "{e}");
        assert_eq!(host.devices().len(), 2);
        host.stop(Duration::from_secs(1));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn apply_reconciles_the_whole_set_or_nothing() {
        let d = dir("apply");
        let host = Host::new(BackendChoice::Emulated, HostLimits::default()).unwrap();
        let set = |v: &[(&str, u8, u32)]| -> Vec<DeviceSpec> {
            v.iter()
                .map(|&(n, mac, qp)| {
                    let mut c = cfg(mac);
                    c.max_qp = qp;
                    DeviceSpec::new(d.join(format!("{n}.sock")), c)
                })
                .collect()
        };
        let c = host.apply(set(&[("a", 1, 16), ("b", 2, 16)])).unwrap();
        assert_eq!(c.added, ["a", "b"]);
        // b removed, c added, a's next client gets 32 QPs.
        let c = host.apply(set(&[("a", 1, 32), ("c", 3, 16)])).unwrap();
        assert_eq!(
            c,
            Changes {
                added: vec!["c".into()],
                removed: vec!["b".into()],
                updated: vec!["a".into()],
            }
        );
        assert!(!d.join("b.sock").exists() && d.join("c.sock").exists());
        // A MAC moves from a removed device to a new one in one reload.
        let c = host.apply(set(&[("a", 1, 32), ("d", 3, 16)])).unwrap();
        assert_eq!((c.added, c.removed), (vec!["d".into()], vec!["c".into()]));
        // Two devices with one MAC: refused, nothing changed.
        let before = host.devices();
        assert!(host.apply(set(&[("a", 1, 32), ("e", 1, 16)])).is_err());
        assert_eq!(host.devices(), before);
        host.stop(Duration::from_secs(1));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn apply_keeps_the_devices_added_at_run_time() {
        let d = dir("runtime");
        let limits = HostLimits {
            max_devices: 3,
            ..HostLimits::default()
        };
        let host = Host::new(BackendChoice::Emulated, limits).unwrap();
        let spec = |n: &str, mac: u8| DeviceSpec::new(d.join(format!("{n}.sock")), cfg(mac));
        host.apply(vec![spec("a", 1)]).unwrap();
        host.add_at_runtime(spec("r", 2)).unwrap();
        let origin = |n: &str| {
            host.status()
                .into_iter()
                .find(|s| s.name == n)
                .map(|s| s.origin)
        };
        assert_eq!(origin("r"), Some(Origin::Runtime));
        // A reload that does not name `r` keeps it, and counts it against the limits and MACs.
        let c = host.apply(vec![spec("b", 3)]).unwrap();
        assert_eq!((c.added, c.removed), (vec!["b".into()], vec!["a".into()]));
        assert_eq!(origin("r"), Some(Origin::Runtime));
        assert!(
            host.apply(vec![spec("b", 3), spec("c", 2)]).is_err(),
            "r's MAC"
        );
        assert!(
            host.apply(vec![spec("b", 3), spec("c", 4), spec("e", 5)])
                .is_err(),
            "four devices with r"
        );
        // Named by the configuration, it becomes the configuration's.
        host.apply(vec![spec("b", 3), spec("r", 2)]).unwrap();
        assert_eq!(origin("r"), Some(Origin::Config));
        let c = host.apply(vec![spec("b", 3)]).unwrap();
        assert_eq!(c.removed, ["r"]);
        host.stop(Duration::from_secs(1));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn removing_a_device_closes_its_clients_connection() {
        let d = dir("remove");
        let host = Host::new(BackendChoice::Emulated, HostLimits::default()).unwrap();
        host.add(DeviceSpec::new(d.join("a.sock"), cfg(1))).unwrap();
        host.add(DeviceSpec::new(d.join("b.sock"), cfg(2))).unwrap();
        let mut a = vfio_user::Client::new(&d.join("a.sock")).unwrap();
        let mut b = vfio_user::Client::new(&d.join("b.sock")).unwrap();
        let mut id = [0u8; 4];
        a.region_read(7, 0, &mut id).unwrap();
        let t = Instant::now();
        assert!(host.remove("a"));
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        assert!(
            a.region_read(7, 0, &mut id).is_err(),
            "a's connection is closed"
        );
        // The other device's client is untouched.
        b.region_read(7, 0, &mut id).unwrap();
        assert_eq!(u32::from_le_bytes(id), 0x0820_15ad);
        host.stop(Duration::from_secs(1));
        let _ = std::fs::remove_dir_all(&d);
    }
}
