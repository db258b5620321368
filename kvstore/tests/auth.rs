//! etcd least privilege against a real etcd with client-certificate
//! authentication: the apiserver writes its prefixes, readers read what
//! they need and write nothing, a revoked or unknown user gets nothing, and
//! setting up again puts back a role someone widened.

use std::time::Duration;

use kvstore::auth::{self, Admin};
use kvstore::{EtcdBackend, EtcdConfig, KvWrite, Leases, ListWatch, TlsPaths};
use testkit::{EtcdOptions, EtcdServer};

fn config(etcd: &EtcdServer, user: &str) -> EtcdConfig {
    let pki = etcd.pki().expect("TLS etcd");
    let client = pki.issue_client(user);
    EtcdConfig::from_endpoints(
        [etcd.endpoint()],
        &TlsPaths {
            trusted_ca_file: Some(pki.ca.clone()),
            cert_file: Some(client.cert),
            key_file: Some(client.key),
        },
    )
    .unwrap()
}

/// A client of `user`, without the first request `kvstore::connect` makes.
async fn client(etcd: &EtcdServer, user: &str) -> EtcdBackend {
    let config = config(etcd, user);
    kvstore::connect(&config)
        .await
        .unwrap_or_else(|e| panic!("{user} connects: {}", kvstore::error_chain(&e)))
}

fn refused<T: std::fmt::Debug>(what: &str, result: Result<T, kvstore::BackendError>) {
    match result {
        Err(e) if e.is_permission_denied() => {}
        other => panic!("{what}: expected permission denied, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_user_may_do_what_its_role_says_and_nothing_else() {
    let Some(etcd) = EtcdServer::start_or_skip(EtcdOptions::tls()).await else {
        return;
    };
    let mut admin = Admin::connect(&config(&etcd, auth::ROOT_USER))
        .await
        .unwrap();
    admin.enable("c1").await.expect("users, roles, auth on");
    admin
        .enable("c1")
        .await
        .expect("a second run changes nothing");
    admin.add_reader(&auth::remote_reader("c2")).await.unwrap();

    let users: Vec<(String, Vec<String>)> = admin
        .users()
        .await
        .unwrap()
        .into_iter()
        .map(|u| (u.name, u.roles))
        .collect();
    let roles = |r: &str| vec![r.to_owned()];
    assert_eq!(
        users,
        [
            ("apiserver".to_owned(), roles("mesh-apiserver")),
            ("local".to_owned(), roles("mesh-reader")),
            ("remote-c2".to_owned(), roles("mesh-reader")),
            ("root".to_owned(), roles("root")),
        ]
    );

    let node_key = "cilium/state/nodes/v1/c1/n1";
    let private = format!("{}sessions/x", api::keys::registry_prefix("c1"));
    let apiserver = client(&etcd, auth::APISERVER_USER).await;
    apiserver.put(node_key, b"{}", None).await.unwrap();
    apiserver.put(&private, b"x", None).await.unwrap();
    let lease = apiserver.grant(Duration::from_secs(30)).await.unwrap();
    apiserver
        .put(api::keys::HEARTBEAT_KEY, b"t", Some(lease))
        .await
        .unwrap();
    refused(
        "the apiserver writing another cluster's private prefix",
        apiserver
            .put(
                &format!("{}x", api::keys::registry_prefix("c2")),
                b"x",
                None,
            )
            .await,
    );

    for user in [auth::LOCAL_READER, "remote-c2"] {
        let reader = client(&etcd, user).await;
        let listing = reader.list("cilium/state/").await.unwrap();
        assert_eq!(listing.kvs.len(), 1, "{user} reads the state");
        reader.get(api::keys::HEARTBEAT_KEY).await.unwrap();
        reader.list("cilium/synced/").await.unwrap();
        let _watch = reader
            .watch("cilium/state/", listing.revision + 1)
            .await
            .unwrap();
        refused(
            &format!("{user} put"),
            reader.put(node_key, b"{}", None).await,
        );
        refused(&format!("{user} delete"), reader.delete(node_key).await);
        refused(
            &format!("{user} put elsewhere"),
            reader.put("elsewhere", b"x", None).await,
        );
        refused(
            &format!("{user} reads the private prefix"),
            reader.list(&api::keys::registry_prefix("c1")).await,
        );
        refused(
            &format!("{user} reads all of cilium/"),
            reader.list("cilium/").await,
        );
    }

    // A certificate of the right CA whose CN is no user, and a revoked user.
    let stranger = config(&etcd, "remote-c9");
    let err = kvstore::connect(&stranger).await.unwrap_err();
    assert!(
        kvstore::error_chain(&err).contains("permission denied"),
        "{}",
        kvstore::error_chain(&err)
    );
    let remote = client(&etcd, "remote-c2").await;
    assert!(admin.revoke("remote-c2").await.unwrap());
    assert!(!admin.revoke("remote-c2").await.unwrap(), "already gone");
    refused("a revoked reader", remote.list("cilium/state/").await);

    // Someone widens the reader role; enabling again takes it back.
    let mut raw = etcd_client::Client::connect([etcd.endpoint()], Some(admin_options(&etcd)))
        .await
        .unwrap();
    raw.role_grant_permission(
        "mesh-reader",
        etcd_client::Permission::read_write("mesh/").with_prefix(),
    )
    .await
    .unwrap();
    let local = client(&etcd, auth::LOCAL_READER).await;
    local.list("mesh/").await.expect("widened");
    admin.enable("c1").await.unwrap();
    refused("the widened grant is taken back", local.list("mesh/").await);
}

fn admin_options(etcd: &EtcdServer) -> etcd_client::ConnectOptions {
    let pki = etcd.pki().unwrap();
    let root = pki.issue_client(auth::ROOT_USER);
    let read = |p: &std::path::Path| std::fs::read(p).unwrap();
    etcd_client::ConnectOptions::new().with_tls(
        etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(read(&pki.ca)))
            .identity(etcd_client::Identity::from_pem(
                read(&root.cert),
                read(&root.key),
            )),
    )
}
