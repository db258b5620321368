//! The etcd harness itself: start, SIGKILL, restart on the same data dir,
//! restart empty, TLS, cleanup on drop.

use std::net::TcpStream;

use testkit::{EtcdOptions, EtcdServer};

fn accepts(endpoint: &str) -> bool {
    let addr = endpoint.rsplit("//").next().expect("endpoint has a scheme");
    TcpStream::connect(addr).is_ok()
}

#[tokio::test]
async fn kill_restart_and_restart_empty() {
    let Some(mut etcd) = EtcdServer::start_or_skip(EtcdOptions::default()).await else {
        return;
    };
    let endpoint = etcd.endpoint();
    assert!(endpoint.starts_with("http://127.0.0.1:"), "{endpoint}");
    assert!(accepts(&endpoint), "etcd accepts connections once ready");
    let wal = etcd.data_dir().join("member/wal");
    assert!(wal.is_dir(), "etcd wrote its WAL to {}", wal.display());

    etcd.kill();
    assert!(!etcd.is_running());
    assert!(!accepts(&endpoint), "nothing listens after SIGKILL");

    let marker = etcd.data_dir().join("member/marker");
    std::fs::write(&marker, b"kept").expect("write marker");
    etcd.restart().await;
    assert!(etcd.is_running());
    assert_eq!(etcd.endpoint(), endpoint, "restart keeps the ports");
    assert!(marker.exists(), "restart keeps the data dir");

    etcd.restart_empty().await;
    assert!(
        !marker.exists(),
        "restart_empty starts from an empty data dir"
    );
    assert!(accepts(&endpoint));

    let dir = etcd.dir().to_owned();
    drop(etcd);
    assert!(!accepts(&endpoint), "drop kills etcd");
    assert!(!dir.exists(), "drop removes the temporary directory");
}

#[tokio::test]
async fn tls_server_writes_certificates() {
    let Some(etcd) = EtcdServer::start_or_skip(EtcdOptions::tls()).await else {
        return;
    };
    assert!(etcd.endpoint().starts_with("https://127.0.0.1:"));
    let pki = etcd.pki().expect("TLS server has a PKI");
    for path in [
        &pki.ca,
        &pki.client.cert,
        &pki.client.key,
        &pki.rogue_client.cert,
    ] {
        let pem = std::fs::read_to_string(path).expect("read PEM");
        assert!(pem.starts_with("-----BEGIN"), "{} is PEM", path.display());
    }
    assert!(accepts(&etcd.endpoint()));
}
