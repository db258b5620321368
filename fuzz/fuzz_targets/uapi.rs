//! Answers of the userspace WireGuard device on its UAPI socket.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut reader = std::io::Cursor::new(data);
    // Several answers in a row, as a long-lived socket reads them.
    while tunnel::wireguard::uapi::read_answer(&mut reader).is_ok() {}
});
