//! A persistent multi-queue TUN device for the userspace WireGuard backend.
//!
//! boringtun opens its TUN device itself, but that device vanishes with the
//! process: an agent restart would take the interface, its addresses and the
//! routes through it down with it. Here the device is opened with
//! `TUNSETPERSIST`, so it outlives the agent; the next agent attaches to the
//! same device (same name, same flags), and established flows only see the
//! packets lost while no process was attached. boringtun accepts an open TUN
//! file descriptor in place of a name (its `TunSocket::new` parses a numeric
//! name as a descriptor), which is how the descriptor is handed over.
//!
//! This is the only module of the crate with `unsafe` code: the two `ioctl`s
//! that name the device and make it persistent. std and the safe `nix`
//! wrappers have no TUN API.

#![expect(
    unsafe_code,
    reason = "TUNSETIFF and TUNSETPERSIST are ioctls with no safe wrapper"
)]

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd as _, OwnedFd};

use libc::{TUNSETIFF, TUNSETPERSIST};
/// `IFF_TUN | IFF_NO_PI | IFF_MULTI_QUEUE`: an L3 device without packet info
/// header, multi-queue like boringtun's own devices so either can attach.
const TUN_FLAGS: libc::c_short =
    (libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_MULTI_QUEUE) as libc::c_short;

/// `struct ifreq` as far as `TUNSETIFF` reads it: the name and the flags of
/// the union, padded to the kernel's 40-byte size.
#[repr(C)]
struct IfReqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

const _: () = assert!(std::mem::size_of::<IfReqFlags>() == 40);

/// Opens (creating if needed) the persistent TUN device `name` in the calling
/// thread's network namespace and returns the queue's descriptor.
///
/// # Errors
///
/// The `io::Error` of `open` or `ioctl`, e.g. `EINVAL`/`EBUSY` if a link of
/// another kind or with other flags has that name.
pub(crate) fn open_persistent(name: &str) -> io::Result<OwnedFd> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "tun name must be 1 to 15 bytes",
        ));
    }
    let file: File = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let mut request = IfReqFlags {
        name: [0; libc::IFNAMSIZ],
        flags: TUN_FLAGS,
        _pad: [0; 22],
    };
    request.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: `file` is an open descriptor of /dev/net/tun; TUNSETIFF reads a
    // `struct ifreq` (40 bytes, NUL-terminated name of < IFNAMSIZ bytes,
    // flags) from the pointer, which points to a live, properly sized and
    // aligned `IfReqFlags` for the duration of the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut request as *mut IfReqFlags) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TUNSETPERSIST takes its argument by value (an int, 1 = persist);
    // no memory is passed, and `file` is a TUN queue attached just above.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETPERSIST, 1 as libc::c_ulong) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file.into())
}
