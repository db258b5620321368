//! Attaching the programs to devices of the calling thread's network
//! namespace (use [`crate::netns::run_in`] to pick one), as TCX links pinned
//! under `<bpffs>/links/PROGRAM:IFINDEX:IFNAME`.
//!
//! Pinning is what lets an agent restart without a gap: the link (and with it
//! the program) stays attached while no process holds it, and the next agent
//! swaps its freshly loaded program into the same link with `BPF_LINK_UPDATE`.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use aya::{
    pin::PinError,
    programs::{
        links::{FdLink, LinkError, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        LinkOrder, ProgramError, TcAttachType,
    },
};

use crate::{Datapath, Program};

/// Errors of attaching and detaching.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No device of that name in the calling thread's network namespace.
    #[error("no network device {ifname} in this network namespace")]
    NoDevice {
        ifname: String,
        #[source]
        source: nix::Error,
    },
    /// Reading or changing the link pins failed.
    #[error("cannot manage link pins under {path}")]
    Pins {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The kernel refused the attachment.
    #[error("cannot attach {program} to {ifname}")]
    Attach {
        program: &'static str,
        ifname: String,
        #[source]
        source: ProgramError,
    },
    /// The new link could not be pinned.
    #[error("cannot pin the link of {program} on {ifname} at {path}")]
    Pin {
        program: &'static str,
        ifname: String,
        path: PathBuf,
        #[source]
        source: PinError,
    },
    /// The link is not a TCX link (aya refused the conversion).
    #[error("link of {program} on {ifname} is not a TCX link")]
    NotTcx {
        program: &'static str,
        ifname: String,
        #[source]
        source: LinkError,
    },
    /// Loading the program or updating the config map failed.
    #[error(transparent)]
    Datapath(#[from] Box<crate::Error>),
}

/// What [`Datapath::attach_from_pod`] and friends did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachOutcome {
    /// A new link was created and pinned.
    Created,
    /// A pinned link existed and now runs this loader's program (restart).
    Replaced,
}

/// Kind of device where kernel-routed pod traffic arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostDevice {
    /// An Ethernet device (native routing over the underlay): `from_netdev`.
    Ethernet,
    /// An L3 device without MAC header (WireGuard, TUN): `from_l3dev`.
    L3,
}

/// One pinned link, parsed from its file name.
#[derive(Debug)]
struct PinName {
    path: PathBuf,
    program: String,
    ifindex: u32,
    ifname: String,
}

fn list_pins(links: &Path) -> Result<Vec<PinName>, Error> {
    let err = |source| Error::Pins {
        path: links.to_owned(),
        source,
    };
    let entries = match fs::read_dir(links) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(err(e)),
    };
    let mut pins = Vec::new();
    for entry in entries {
        let entry = entry.map_err(err)?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        // Interface names cannot contain ':', so the split is unambiguous.
        let mut parts = name.splitn(3, ':');
        let (Some(program), Some(ifindex), Some(ifname)) =
            (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let Ok(ifindex) = ifindex.parse() else {
            continue;
        };
        pins.push(PinName {
            path: entry.path(),
            program: program.to_owned(),
            ifindex,
            ifname: ifname.to_owned(),
        });
    }
    Ok(pins)
}

fn unpin(path: &Path) -> Result<(), Error> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::Pins {
            path: path.to_owned(),
            source,
        }),
    }
}

impl Datapath {
    /// Attaches `from_pod` to the host side of a pod's veth.
    ///
    /// Register the pod in [`crate::Endpoints`] first: until then its
    /// packets are dropped as `UnknownSource`.
    ///
    /// # Errors
    ///
    /// See [`Error`].
    pub fn attach_from_pod(&mut self, ifname: &str) -> Result<AttachOutcome, Error> {
        self.attach(Program::FromPod, ifname)
    }

    /// Attaches `from_overlay` to the VXLAN device (external mode) and makes
    /// it the device `from_pod` tunnels through.
    ///
    /// # Errors
    ///
    /// See [`Error`].
    pub fn attach_from_overlay(&mut self, ifname: &str) -> Result<AttachOutcome, Error> {
        let (outcome, ifindex) = self.attach_inner(Program::FromOverlay, ifname)?;
        self.update_config(|c| c.vxlan_ifindex = ifindex)
            .map_err(Box::new)?;
        Ok(outcome)
    }

    /// Attaches the program that delivers kernel-routed traffic (native
    /// routing, WireGuard) to local pods.
    ///
    /// # Errors
    ///
    /// See [`Error`].
    pub fn attach_from_host_device(
        &mut self,
        ifname: &str,
        kind: HostDevice,
    ) -> Result<AttachOutcome, Error> {
        let program = match kind {
            HostDevice::Ethernet => Program::FromNetdev,
            HostDevice::L3 => Program::FromL3dev,
        };
        self.attach(program, ifname)
    }

    /// Detaches every program of this datapath from `ifname` (in this
    /// namespace's pins, whatever its ifindex was) and returns how many links
    /// were removed. Detaching the VXLAN device also stops tunnelling.
    ///
    /// # Errors
    ///
    /// [`Error::Pins`] when a pin cannot be removed.
    pub fn detach(&mut self, ifname: &str) -> Result<usize, Error> {
        let mut removed = 0;
        for pin in list_pins(&self.links_dir())?
            .into_iter()
            .filter(|p| p.ifname == ifname)
        {
            // The pin is the last reference (this process drops its link fds
            // right after pinning): removing it releases and detaches the link.
            unpin(&pin.path)?;
            if pin.program == Program::FromOverlay.name() {
                self.update_config(|c| c.vxlan_ifindex = 0)
                    .map_err(Box::new)?;
            }
            removed += 1;
        }
        Ok(removed)
    }

    fn links_dir(&self) -> PathBuf {
        self.dir.join("links")
    }

    fn attach(&mut self, program: Program, ifname: &str) -> Result<AttachOutcome, Error> {
        Ok(self.attach_inner(program, ifname)?.0)
    }

    fn attach_inner(
        &mut self,
        program: Program,
        ifname: &str,
    ) -> Result<(AttachOutcome, u32), Error> {
        let name = program.name();
        let ifindex = nix::net::if_::if_nametoindex(ifname).map_err(|source| Error::NoDevice {
            ifname: ifname.to_owned(),
            source,
        })?;
        let links = self.links_dir();
        fs::create_dir_all(&links).map_err(|source| Error::Pins {
            path: links.clone(),
            source,
        })?;
        let pin_path = links.join(format!("{name}:{ifindex}:{ifname}"));
        let prog = self.program(program).map_err(Box::new)?;

        let mut outcome = None;
        if pin_path.exists() {
            match PinnedLink::from_pin(&pin_path) {
                Ok(pinned) => {
                    let link =
                        SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(|source| {
                            Error::NotTcx {
                                program: name,
                                ifname: ifname.to_owned(),
                                source,
                            }
                        })?;
                    match prog.attach_to_link(link) {
                        Ok(id) => {
                            // Dropping our handle closes the fd; the pin keeps the link.
                            drop(prog.take_link(id).map_err(|source| Error::Attach {
                                program: name,
                                ifname: ifname.to_owned(),
                                source,
                            })?);
                            outcome = Some(AttachOutcome::Replaced);
                        }
                        Err(e) => {
                            tracing::warn!(pin = %pin_path.display(), error = %e, "stale link pin, recreating");
                            unpin(&pin_path)?;
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(pin = %pin_path.display(), error = %e, "unreadable link pin, recreating");
                    unpin(&pin_path)?;
                }
            }
        }

        let outcome = match outcome {
            Some(outcome) => outcome,
            None => {
                let attach_err = |source| Error::Attach {
                    program: name,
                    ifname: ifname.to_owned(),
                    source,
                };
                let id = prog
                    .attach_with_options(
                        ifname,
                        TcAttachType::Ingress,
                        TcAttachOptions::TcxOrder(LinkOrder::default()),
                    )
                    .map_err(attach_err)?;
                let link = prog.take_link(id).map_err(attach_err)?;
                let link = FdLink::try_from(link).map_err(|source| Error::NotTcx {
                    program: name,
                    ifname: ifname.to_owned(),
                    source,
                })?;
                link.pin(&pin_path).map_err(|source| Error::Pin {
                    program: name,
                    ifname: ifname.to_owned(),
                    path: pin_path.clone(),
                    source,
                })?;
                AttachOutcome::Created
            }
        };

        // One role per device: drop pins of the same name that belong to a
        // recreated device (other ifindex) or to another of our programs.
        for stale in list_pins(&links)?
            .into_iter()
            .filter(|p| p.ifname == ifname && (p.ifindex != ifindex || p.program != name))
        {
            unpin(&stale.path)?;
        }
        tracing::debug!(program = name, ifname, ifindex, ?outcome, "attached");
        Ok((outcome, ifindex))
    }
}
