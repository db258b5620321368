//! A minimal client of the WireGuard cross-platform UAPI
//! (<https://www.wireguard.com/xplatform/>) over a socketpair.
//!
//! Why not `wireguard-control`'s `Backend::Userspace`: it finds the device by
//! the socket path `/var/run/wireguard/<if>.sock`, which is shared by every
//! network namespace of the host (two node namespaces each with a `wg-mesh`
//! device would fight over one path), and when the socket is missing it
//! starts `wireguard-go`. boringtun instead accepts one end of a socketpair
//! (`DeviceConfig::uapi_fd`): no file system path, no name clashes, and
//! closing our end stops the device's event loop, which gives a clean
//! shutdown. The protocol is small: `set=1` and `get=1` requests of
//! `key=value` lines ending with an empty line, answered by `errno=N` and an
//! empty line.
//!
//! boringtun reads each request with a fresh buffered reader and drops what it
//! over-read, so requests are strictly sequential: one request, then its whole
//! answer, then the next.

use std::io::{self, BufRead, BufReader, Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// How long an answer may take; the device answers in microseconds unless its
/// event loop is wedged.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of UAPI exchanges.
#[derive(Debug, thiserror::Error)]
pub enum UapiError {
    /// The socket failed or timed out (the device's event loop is gone or
    /// stuck).
    #[error("wireguard uapi socket")]
    Io(#[from] io::Error),
    /// The device closed the socket.
    #[error("wireguard uapi socket closed by the device")]
    Closed,
    /// The device refused the request.
    #[error("wireguard device refused the {request} request with errno {errno}")]
    Refused {
        /// `set` or `get`.
        request: &'static str,
        /// The errno it answered.
        errno: i32,
    },
    /// The answer is not `key=value` lines.
    #[error("malformed wireguard uapi answer line {line:?}")]
    Malformed {
        /// The line.
        line: String,
    },
}

/// Our end of the UAPI socketpair.
#[derive(Debug)]
pub(crate) struct UapiClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl UapiClient {
    /// Wraps our end of the socketpair.
    pub(crate) fn new(stream: UnixStream) -> io::Result<Self> {
        stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
        stream.set_write_timeout(Some(ANSWER_TIMEOUT))?;
        let writer = stream.try_clone()?;
        Ok(Self {
            reader: BufReader::new(stream),
            writer,
        })
    }

    /// Shuts our end down; the device sees EOF and stops its event loop.
    pub(crate) fn shutdown(&self) {
        let _ = self.writer.shutdown(std::net::Shutdown::Both);
    }

    /// Sends a `set=1` request with `lines` (each `key=value`, no newline).
    pub(crate) fn set(&mut self, lines: &[String]) -> Result<(), UapiError> {
        let mut request = String::from("set=1\n");
        for line in lines {
            request.push_str(line);
            request.push('\n');
        }
        request.push('\n');
        self.writer.write_all(request.as_bytes())?;
        let (_, errno) = self.answer()?;
        match errno {
            0 => Ok(()),
            errno => Err(UapiError::Refused {
                request: "set",
                errno,
            }),
        }
    }

    /// Sends `get=1` and returns the `key=value` pairs of the answer.
    pub(crate) fn get(&mut self) -> Result<Vec<(String, String)>, UapiError> {
        self.writer.write_all(b"get=1\n\n")?;
        let (pairs, errno) = self.answer()?;
        match errno {
            0 => Ok(pairs),
            errno => Err(UapiError::Refused {
                request: "get",
                errno,
            }),
        }
    }

    fn answer(&mut self) -> Result<(Vec<(String, String)>, i32), UapiError> {
        read_answer(&mut self.reader)
    }
}

/// Largest UAPI answer read, in bytes (a device lists each peer in a few
/// hundred bytes; this leaves room for thousands).
const MAX_ANSWER: u64 = 4 << 20;

/// Reads one UAPI answer: `key=value` lines up to the empty line; returns
/// the pairs other than `errno` and the errno. An answer without `errno`,
/// a line that is not `key=value` or not UTF-8, or more than 4 MiB is
/// [`UapiError::Malformed`]; the end of the stream is [`UapiError::Closed`].
///
/// # Errors
///
/// As above, or the reader's error.
pub fn read_answer(reader: &mut impl BufRead) -> Result<(Vec<(String, String)>, i32), UapiError> {
    let mut reader = reader.take(MAX_ANSWER);
    let mut pairs = Vec::new();
    let mut errno = None;
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            return Err(if reader.limit() == 0 {
                UapiError::Malformed {
                    line: format!("(answer longer than {MAX_ANSWER} bytes)"),
                }
            } else {
                UapiError::Closed
            });
        }
        let Ok(text) = std::str::from_utf8(&line) else {
            return Err(UapiError::Malformed {
                line: String::from_utf8_lossy(&line).into_owned(),
            });
        };
        let text = text.trim_end_matches('\n');
        if text.is_empty() {
            return match errno {
                Some(errno) => Ok((pairs, errno)),
                None => Err(UapiError::Malformed {
                    line: String::new(),
                }),
            };
        }
        let (key, value) = text.split_once('=').ok_or_else(|| UapiError::Malformed {
            line: text.to_owned(),
        })?;
        if key == "errno" {
            errno = Some(value.parse().map_err(|_| UapiError::Malformed {
                line: text.to_owned(),
            })?);
        } else {
            pairs.push((key.to_owned(), value.to_owned()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scripted device on the other end: checks the request, sends `reply`.
    fn device(
        expect: &'static str,
        reply: &'static str,
    ) -> (UapiClient, std::thread::JoinHandle<()>) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let handle = std::thread::spawn(move || {
            let mut theirs = theirs;
            let mut got = vec![0u8; expect.len()];
            theirs.read_exact(&mut got).unwrap();
            assert_eq!(String::from_utf8(got).unwrap(), expect);
            theirs.write_all(reply.as_bytes()).unwrap();
        });
        (UapiClient::new(ours).unwrap(), handle)
    }

    #[test]
    fn set_sends_lines_and_reads_errno() {
        let (mut client, dev) = device("set=1\nlisten_port=1\n\n", "errno=0\n\n");
        client.set(&["listen_port=1".to_owned()]).unwrap();
        dev.join().unwrap();
    }

    #[test]
    fn refused_set_reports_errno() {
        let (mut client, dev) = device("set=1\nx=y\n\n", "errno=22\n\n");
        let err = client.set(&["x=y".to_owned()]).unwrap_err();
        assert!(matches!(err, UapiError::Refused { errno: 22, .. }), "{err}");
        dev.join().unwrap();
    }

    #[test]
    fn get_returns_pairs() {
        let (mut client, dev) =
            device("get=1\n\n", "listen_port=51871\npublic_key=ab\nerrno=0\n\n");
        let pairs = client.get().unwrap();
        assert_eq!(
            pairs,
            vec![
                ("listen_port".to_owned(), "51871".to_owned()),
                ("public_key".to_owned(), "ab".to_owned())
            ]
        );
        dev.join().unwrap();
    }

    #[test]
    fn closed_and_garbage_answers_are_errors() {
        let (mut client, dev) = device("get=1\n\n", "");
        assert!(matches!(client.get().unwrap_err(), UapiError::Closed));
        dev.join().unwrap();
        let (mut client, dev) = device("get=1\n\n", "nonsense\n\n");
        assert!(matches!(
            client.get().unwrap_err(),
            UapiError::Malformed { .. }
        ));
        dev.join().unwrap();
    }

    #[test]
    fn an_answer_is_bounded_and_checked_without_a_device() {
        let read = |bytes: &[u8]| read_answer(&mut std::io::Cursor::new(bytes.to_vec()));
        assert_eq!(
            read(b"public_key=ab\nerrno=0\n\n").unwrap(),
            (vec![("public_key".to_owned(), "ab".to_owned())], 0)
        );
        assert!(matches!(
            read(b"\xff=1\nerrno=0\n\n"),
            Err(UapiError::Malformed { .. })
        ));
        assert!(matches!(
            read(b"errno=x\n\n"),
            Err(UapiError::Malformed { .. })
        ));
        assert!(matches!(read(b"a=b\n"), Err(UapiError::Closed)));
        let endless = vec![b'a'; (MAX_ANSWER + 10) as usize];
        assert!(matches!(read(&endless), Err(UapiError::Malformed { .. })));
    }
}
