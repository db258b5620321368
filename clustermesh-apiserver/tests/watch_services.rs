//! `WatchServices` against a real etcd: the first message is the full
//! snapshot, and every change of a service or of the endpoints it selects
//! (non-global services included) sends a new one.

use common::{Served, DEADLINE};
use futures::StreamExt as _;
use kvstore::SyncStoreConfig;
use mesh_proto::v1 as pb;

mod common;

/// Next snapshot, as `(namespace/name, global, sorted backend IPs)` per service.
async fn next(
    stream: &mut tonic::Streaming<pb::ListServicesResponse>,
    what: &str,
) -> Vec<(String, bool, Vec<String>)> {
    let msg = tokio::time::timeout(DEADLINE, stream.next())
        .await
        .unwrap_or_else(|_| panic!("no WatchServices snapshot within {DEADLINE:?}: {what}"))
        .unwrap_or_else(|| panic!("WatchServices stream ended: {what}"))
        .unwrap_or_else(|e| panic!("WatchServices stream failed: {what}: {e}"));
    msg.services
        .into_iter()
        .map(|s| {
            let svc = s.service.expect("service set");
            let mut ips: Vec<String> = s.backends.into_iter().map(|b| b.ip).collect();
            ips.sort();
            (format!("{}/{}", svc.namespace, svc.name), svc.global, ips)
        })
        .collect()
}

#[tokio::test]
async fn watch_services_sends_a_snapshot_per_change() {
    if !testkit::require_binary("etcd") {
        return;
    }
    let etcd = testkit::EtcdServer::start().await;
    let served = Served::start(common::config(&etcd, 3), SyncStoreConfig::default()).await;
    let mut client = served.client.clone();

    let mut stream = client
        .watch_services(pb::WatchServicesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(next(&mut stream, "initial, empty").await.is_empty());

    let service = pb::Service {
        namespace: "default".into(),
        name: "web".into(),
        frontend_ips: vec!["10.96.0.10".into()],
        ports: vec![pb::ServicePort {
            name: "http".into(),
            protocol: pb::Protocol::Tcp.into(),
            port: 80,
            target: Some(pb::service_port::Target::TargetPortNumber(8080)),
        }],
        selector: [("app".to_owned(), "web".to_owned())].into(),
        ..Default::default()
    };
    client
        .upsert_service(pb::UpsertServiceRequest {
            service: Some(service.clone()),
        })
        .await
        .unwrap();
    assert_eq!(
        next(&mut stream, "after UpsertService").await,
        [("default/web".to_owned(), false, vec![])]
    );

    // An endpoint the selector matches: a new snapshot with it as backend.
    let (opened, session) = mesh_proto::open_session(&mut client, "n1").await.unwrap();
    let sid = opened.session_id;
    client
        .register_node(pb::RegisterNodeRequest {
            session_id: sid.clone(),
            node: Some(pb::Node {
                name: "n1".into(),
                internal_ips: vec!["192.168.1.2".into()],
                pod_cidrs: vec!["10.1.1.0/24".into()],
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    client
        .upsert_endpoint(pb::UpsertEndpointRequest {
            session_id: sid.clone(),
            endpoint: Some(pb::Endpoint {
                namespace: "default".into(),
                name: "web-1".into(),
                ips: vec!["10.1.1.5".into()],
                labels: [("app".to_owned(), "web".to_owned())].into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    assert_eq!(
        next(&mut stream, "after a selected endpoint").await,
        [("default/web".to_owned(), false, vec!["10.1.1.5".to_owned()])]
    );

    // Global flag flipped: the snapshot says so.
    client
        .upsert_service(pb::UpsertServiceRequest {
            service: Some(pb::Service {
                global: true,
                ..service
            }),
        })
        .await
        .unwrap();
    assert_eq!(
        next(&mut stream, "after the global flag").await,
        [("default/web".to_owned(), true, vec!["10.1.1.5".to_owned()])]
    );

    client
        .delete_service(pb::DeleteServiceRequest {
            namespace: "default".into(),
            name: "web".into(),
        })
        .await
        .unwrap();
    assert!(next(&mut stream, "after DeleteService").await.is_empty());

    drop(stream);
    drop(session);
    served.stop().await;
}
