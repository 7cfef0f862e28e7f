//! The API server tier's own smoke tests: a real kube-apiserver + etcd of the pinned release
//! (built from the Go module proxy, cached) stores Services and discovery.k8s.io/v1 EndpointSlices, and a
//! restart makes watches end and old resource versions expire (410), with objects kept.
//! Under CI=true, failing to build or start the API server fails these tests.

use std::time::Duration;
use weir_e2e::apiserver::{ApiServer, ApiServerOptions, WatchMsg};

const SERVICES: &str = "/api/v1/namespaces/default/services";
const SLICES: &str = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices";

const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: default
spec:
  clusterIP: 10.96.0.50
  ports:
    - name: http
      port: 80
      targetPort: 8080
      protocol: TCP
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: default
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
endpoints:
  - addresses: ["10.244.1.5"]
    conditions: {ready: true, serving: true, terminating: false}
    nodeName: node1
    zone: zone-a
    hints:
      forZones: [{name: zone-a}]
  - addresses: ["10.244.2.7"]
    conditions: {ready: false, serving: true, terminating: true}
    nodeName: node2
ports:
  - name: http
    port: 8080
    protocol: TCP
    appProtocol: http
"#;

fn other_service(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
         spec:\n  ports: [{{name: p, port: 81, protocol: TCP}}]\n"
    )
}

/// Next message that is not an ADDED/MODIFIED/DELETED event of an unrelated kind.
fn end_or_expired(w: &weir_e2e::apiserver::Watch, timeout: Duration) -> Option<WatchMsg> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.checked_duration_since(std::time::Instant::now())?;
        match w.recv(left)? {
            m @ WatchMsg::Ended(_) => return Some(m),
            m if m.is_expired() => return Some(m),
            WatchMsg::Event(_) => continue,
        }
    }
}

#[test]
fn services_and_endpointslices_persist_and_watches_expire_across_a_restart() {
    let Some(mut api) = ApiServer::start_or_skip(ApiServerOptions::default()) else {
        return;
    };
    assert!(api.url().starts_with("https://127.0.0.1:"));
    assert!(api.kubeconfig_path().is_file());
    assert!(!api.token().is_empty());

    api.apply_yaml(WEB).expect("apply Service + EndpointSlice");

    // Listed back, as written.
    let svc = api.get_json(&format!("{SERVICES}/web")).expect("get web");
    assert_eq!(svc["spec"]["clusterIP"], "10.96.0.50");
    let slices = api.get_json(SLICES).expect("list slices");
    let items = slices["items"].as_array().expect("items");
    assert_eq!(items.len(), 1, "{slices}");
    let es = &items[0];
    // The built-in type: the list names the group version, its items do not.
    assert_eq!(slices["apiVersion"], "discovery.k8s.io/v1");
    assert_eq!(slices["kind"], "EndpointSliceList");
    assert_eq!(es["addressType"], "IPv4");
    assert_eq!(es["endpoints"][0]["addresses"][0], "10.244.1.5");
    assert_eq!(es["endpoints"][0]["hints"]["forZones"][0]["name"], "zone-a");
    assert_eq!(es["endpoints"][1]["conditions"]["terminating"], true);
    assert_eq!(es["ports"][0]["appProtocol"], "http");
    let by_kind = api
        .get("endpointslice", Some("default"), "web-1")
        .expect("kubectl get endpointslice");
    assert_eq!(
        by_kind["metadata"]["labels"]["kubernetes.io/service-name"],
        "web"
    );

    // A live watch sees a new Service.
    let svc_rv = api.list_resource_version(SERVICES).expect("services rv");
    let slice_rv = api.list_resource_version(SLICES).expect("slices rv");
    let watch = api.watch(SERVICES, Some(&svc_rv)).expect("watch");
    api.apply_yaml(&other_service("before-restart"))
        .expect("create");
    watch
        .wait_for(Duration::from_secs(30), |e| {
            e["type"] == "ADDED" && e["object"]["metadata"]["name"] == "before-restart"
        })
        .expect("the watch saw the new Service");

    // Restart: the open watch ends (closed stream or 410), objects persist, and watching
    // from a resource version of before the restart is Expired.
    api.restart().expect("restart");
    let end = end_or_expired(&watch, Duration::from_secs(60));
    assert!(
        matches!(end, Some(WatchMsg::Ended(_))) || end.as_ref().is_some_and(|m| m.is_expired()),
        "the watch from before the restart neither ended nor expired: {end:?}"
    );
    drop(watch);

    for (path, rv) in [(SERVICES, &svc_rv), (SLICES, &slice_rv)] {
        let w = api.watch(path, Some(rv)).expect("watch after restart");
        let m = end_or_expired(&w, Duration::from_secs(30));
        assert!(
            m.as_ref().is_some_and(|m| m.is_expired()),
            "{path} from resourceVersion {rv} after a restart: {m:?}"
        );
    }
    let svc = api.get_json(&format!("{SERVICES}/web")).expect("web kept");
    assert_eq!(svc["spec"]["clusterIP"], "10.96.0.50");
    api.get_json(&format!("{SERVICES}/before-restart"))
        .expect("before-restart kept");
    let slices = api.get_json(SLICES).expect("slices kept");
    assert_eq!(slices["items"].as_array().map(Vec::len), Some(1));

    // An outage: requests fail while stopped, work again after.
    api.stop_apiserver().expect("stop");
    assert!(api.get_json(SERVICES).is_err());
    api.start_apiserver().expect("start again");
    api.delete("endpointslice", Some("default"), "web-1")
        .expect("delete slice");
    api.delete("service", Some("default"), "web")
        .expect("delete svc");
    let slices = api.get_json(SLICES).expect("list");
    assert_eq!(slices["items"].as_array().map(Vec::len), Some(0));
    assert!(api.get_json(&format!("{SERVICES}/web")).is_err());

    let dir = api.dir().to_owned();
    drop(api);
    assert!(!dir.exists(), "{} left behind", dir.display());
}

#[test]
fn rbac_mode_denies_until_a_cluster_role_allows_list_and_watch() {
    let opts = ApiServerOptions::rbac().with_service_account("kube-system", "weir-test");
    let Some(api) = ApiServer::start_or_skip(opts) else {
        return;
    };
    let user = "system:serviceaccount:kube-system:weir-test";
    assert!(api.user_token(user).is_some());
    let denied = api
        .kubectl_as(user, &["get", "services", "-A"])
        .expect_err("no role yet");
    assert!(format!("{denied:#}").contains("forbidden"), "{denied:#}");
    api.apply_yaml(
        r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: weir-test}
rules:
  - apiGroups: [""]
    resources: [services]
    verbs: [list, watch]
  - apiGroups: [discovery.k8s.io]
    resources: [endpointslices]
    verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: weir-test}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: weir-test}
subjects:
  - {kind: ServiceAccount, name: weir-test, namespace: kube-system}
"#,
    )
    .expect("apply ClusterRole");
    // RBAC reads through an informer: allow a moment.
    weir_e2e::wait_until("list allowed", Duration::from_secs(30), || {
        api.kubectl_as(user, &["get", "services", "-A"]).is_ok()
            && api
                .kubectl_as(user, &["get", "endpointslices", "-A"])
                .is_ok()
    })
    .expect("the ClusterRole allows listing");
    // list/watch only: no writes.
    let write = api.kubectl_as(
        user,
        &["create", "service", "clusterip", "x", "--tcp=80:80"],
    );
    assert!(write.is_err(), "a list/watch role could create a Service");
}
