//! The xDS source: a delta-ADS stream to ferry-control filling the same snapshot as the file source; each response is
//! validated whole and ACKed, or NACKed with the reason while the last good snapshot keeps serving.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use ferry_api::protocol::{self, NODE_INBOUND_PORT, NODE_SERVICE, Received, TYPE_COUNT, TYPES, short_type};
use ferry_api::route::RouteSet;
use ferry_api::workload::{DefaultInbound, Workload};
use ferry_api::{Document, one_traffic_policy_error};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;

use crate::discovery::snapshot::{ConfigStore, Snapshot};
use crate::identity::tls::MeshTls;
use crate::settings::{ControlSettings, Settings};
use crate::telemetry::metrics::Metrics;

/// Reconnect delays grow from the first to the last, each with up to 50 % random jitter.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(15));

/// The resources held per type (name → version and document): the last good config.
#[derive(Debug, Default, Clone)]
pub struct Resources {
    types: [BTreeMap<String, (String, Received)>; TYPE_COUNT],
    /// Which types have had their first response (the snapshot is built only once all have).
    initialized: [bool; TYPE_COUNT],
}

impl Resources {
    /// Applies one response to a copy and returns it if every resource in it is valid (all or nothing).
    pub fn apply(&self, response: &DeltaDiscoveryResponse) -> Result<(usize, Resources), String> {
        let Some(index) = TYPES.iter().position(|t| *t == response.type_url) else {
            return Err(format!("unknown resource type `{}`", response.type_url));
        };
        let mut next = self.clone();
        let mut errors = Vec::new();
        for r in &response.resources {
            match &r.resource {
                Some(any) if any.type_url == response.type_url => match protocol::decode(&r.name, any) {
                    Ok(doc) => {
                        next.types[index].insert(r.name.clone(), (r.version.clone(), doc));
                    }
                    Err(e) => errors.push(e.to_string()),
                },
                Some(any) => errors.push(format!(
                    "{}: type `{}` in a {} response",
                    r.name,
                    any.type_url,
                    short_type(&response.type_url)
                )),
                None => errors.push(format!("{}: no resource body", r.name)),
            }
        }
        for name in &response.removed_resources {
            next.types[index].remove(name);
        }
        if protocol::TRAFFIC_POLICY_TYPE == response.type_url {
            let mut targets: BTreeMap<String, String> = BTreeMap::new();
            for (name, (_, doc)) in &next.types[index] {
                if let Received::Document(Document::TrafficPolicy(p)) = doc {
                    let target = format!("{}/{}", p.metadata.namespace, p.spec.target_ref.name);
                    if let Some(first) = targets.insert(target.clone(), name.clone()) {
                        errors.push(format!("{name}: {}", one_traffic_policy_error(&target, &first)));
                    }
                }
            }
        }
        if !errors.is_empty() {
            return Err(errors.join("; "));
        }
        next.initialized[index] = true;
        Ok((index, next))
    }

    pub fn ready(&self) -> bool {
        self.initialized.iter().all(|i| *i)
    }

    /// Every held document, Services first.
    pub fn documents(&self) -> Vec<Document> {
        self.types
            .iter()
            .flat_map(|t| t.values())
            .filter_map(|(_, r)| match r {
                Received::Document(d) => Some(d.clone()),
                Received::Mesh(_) | Received::Workload(_) | Received::Routes(_) => None,
            })
            .collect()
    }

    /// What is held of one type.
    fn held(&self, type_url: &str) -> impl Iterator<Item = &Received> {
        let index = TYPES.iter().position(|t| *t == type_url).expect("one of TYPES");
        self.types[index].values().map(|(_, r)| r)
    }

    /// Every held route set.
    pub fn route_sets(&self) -> Vec<RouteSet> {
        self.held(protocol::ROUTE_SET_TYPE)
            .filter_map(|r| match r {
                Received::Routes(set) => Some(set.clone()),
                _ => None,
            })
            .collect()
    }

    /// The held mesh-wide settings (trust bundle, default mTLS mode).
    pub fn mesh(&self) -> Option<&protocol::Mesh> {
        self.held(protocol::TRUST_BUNDLE_TYPE).find_map(|r| match r {
            Received::Mesh(mesh) => Some(mesh),
            _ => None,
        })
    }

    /// What this proxy's pod serves, as the control plane answered. Without an answer held (it was removed) nothing
    /// is served: every port is denied, never open.
    pub fn workload(&self) -> Workload {
        let held = self.held(protocol::WORKLOAD_TYPE).find_map(|r| match r {
            Received::Workload(w) => Some(w.clone()),
            _ => None,
        });
        held.unwrap_or(Workload { services: Vec::new(), default_inbound: DefaultInbound::Deny })
    }

    fn versions(&self, index: usize) -> std::collections::HashMap<String, String> {
        self.types[index].iter().map(|(n, (v, _))| (n.clone(), v.clone())).collect()
    }
}

/// What the node tells the control plane: its id, and (local mode, `FERRY_SERVICE`) the Services whose endpoint it
/// registers. In Kubernetes mode the control plane ignores the claim: the pod's Services are those selecting it.
fn node(settings: &Settings, control: &ControlSettings) -> Node {
    let mut fields = std::collections::HashMap::new();
    let declared = settings.declared_services();
    if !declared.is_empty() {
        let services = declared.iter().map(|(ns, name)| format!("{ns}/{name}")).collect::<Vec<_>>().join(",");
        fields.insert(NODE_SERVICE.to_string(), Value { kind: Some(Kind::StringValue(services)) });
        // Local explicit mode (the app address is given): callers dial this proxy's inbound listener directly.
        // Transparent mode: callers dial the pod IP at the service port, and interception delivers it here.
        if let (Some(_), Some(inbound)) = (settings.app_addr, settings.inbound_addrs.first()) {
            let port = settings.advertise_port.unwrap_or(inbound.port());
            fields.insert(NODE_INBOUND_PORT.to_string(), Value { kind: Some(Kind::NumberValue(port.into())) });
        }
    }
    Node {
        id: control.node_id.clone(),
        user_agent_name: "ferry".into(),
        metadata: Some(Struct { fields }),
        ..Default::default()
    }
}

/// Runs for the life of the process: connect, stream, and on any failure reconnect after a jittered backoff.
pub async fn run(settings: Arc<Settings>, store: Arc<ConfigStore>, metrics: Arc<Metrics>, tls: Arc<MeshTls>) {
    let control = settings.control.clone().expect("run only with a control plane configured");
    // The control plane knows a proxy by its certificate only.
    tls.wait_ready().await;
    let mut resources = Resources::default();
    let mut version = 0u64;
    let mut delay = BACKOFF.0;
    loop {
        let started = Instant::now();
        let result = session(&settings, &control, &mut resources, &mut version, &store, &metrics, &tls).await;
        metrics.xds_connected.set(0);
        match result {
            Ok(Ended::Renewed) => {
                // The control plane knows a proxy by the certificate its stream opened with: reconnect with the new
                // one at once (the resources held are not sent again).
                tracing::info!("reconnecting to the control plane with the renewed certificate");
                delay = BACKOFF.0;
                continue;
            }
            Ok(Ended::Closed) => {
                tracing::warn!(addr = %control.addr, "the control plane closed the xDS stream; keeping the last good config")
            }
            Err(e) => {
                tracing::warn!(addr = %control.addr, error = %e, "xDS stream failed; keeping the last good config")
            }
        }
        // A stream that lived a while was healthy: start the backoff over.
        if started.elapsed() > Duration::from_secs(30) {
            delay = BACKOFF.0;
        }
        let jittered = delay.mul_f64(1.0 + 0.5 * crate::util::random_fraction());
        tracing::info!(retry_in_ms = jittered.as_millis() as u64, "reconnecting to the control plane");
        tokio::time::sleep(jittered).await;
        delay = (delay * 2).min(BACKOFF.1);
    }
}

/// How a stream ended without an error.
enum Ended {
    /// The control plane closed it.
    Closed,
    /// This proxy's certificate was renewed: time to reconnect with it.
    Renewed,
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("cannot read FERRY_CA_ROOT {0}: {1}")]
    Root(String, std::io::Error),
    #[error("{0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("{}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
}

async fn session(
    settings: &Settings,
    control: &ControlSettings,
    resources: &mut Resources,
    version: &mut u64,
    store: &ConfigStore,
    metrics: &Metrics,
    mesh_tls: &MeshTls,
) -> Result<Ended, SessionError> {
    let mut renewals = mesh_tls.subscribe_serial();
    renewals.borrow_and_update();
    let state = mesh_tls.current().expect("run waits for an identity");
    let tls = crate::identity::control_plane_tls(control, &state.roots_pem, Some(&state.credentials))
        .map_err(|(path, e)| SessionError::Root(path, e))?;
    let channel = Endpoint::from_shared(format!("https://{}", control.addr))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .connect()
        .await?;
    let mut client = AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
    let (tx, rx) = mpsc::channel(8);
    let on_demand = store.on_demand.get();
    // The on-demand subscriptions this stream has sent.
    let mut sent = std::collections::HashSet::new();
    for (index, type_url) in TYPES.iter().enumerate() {
        // Wildcard subscriptions, but Services on demand: the destinations subscribed so far, without `*`. On a
        // reconnect the versions held spare the control plane resending them.
        let (subscribe, unsubscribe) = match on_demand.filter(|_| *type_url == protocol::SERVICE_TYPE) {
            Some(od) => (od.changes(&mut sent).0, vec!["*".to_string()]),
            None => (vec!["*".to_string()], vec![]),
        };
        let request = DeltaDiscoveryRequest {
            node: (index == 0).then(|| node(settings, control)),
            type_url: type_url.to_string(),
            resource_names_subscribe: subscribe,
            resource_names_unsubscribe: unsubscribe,
            initial_resource_versions: resources.versions(index),
            ..Default::default()
        };
        tx.send(request).await.expect("the channel is open and has room");
    }
    let request = tonic::Request::new(ReceiverStream::new(rx));
    let mut responses = client.delta_aggregated_resources(request).await?.into_inner();
    metrics.xds_connected.set(1);
    tracing::info!(addr = %control.addr, node = %control.node_id, "connected to the control plane");
    let _connected = on_demand.map(|od| od.connected());
    loop {
        let subscriptions_changed = async {
            match on_demand {
                Some(od) => od.changed.notified().await,
                None => std::future::pending().await,
            }
        };
        let response = tokio::select! {
            r = responses.message() => match r? {
                Some(response) => response,
                None => return Ok(Ended::Closed),
            },
            _ = renewals.changed() => return Ok(Ended::Renewed),
            () = subscriptions_changed => {
                let od = on_demand.expect("only with on-demand subscriptions");
                let (subscribe, unsubscribe) = od.changes(&mut sent);
                if !(subscribe.is_empty() && unsubscribe.is_empty()) {
                    tracing::debug!(?subscribe, ?unsubscribe, "on-demand subscriptions");
                    let request = DeltaDiscoveryRequest {
                        type_url: protocol::SERVICE_TYPE.to_string(),
                        resource_names_subscribe: subscribe,
                        resource_names_unsubscribe: unsubscribe,
                        ..Default::default()
                    };
                    if tx.send(request).await.is_err() {
                        return Ok(Ended::Closed);
                    }
                }
                continue;
            }
        };
        let label = short_type(&response.type_url).to_string();
        let was_ready = resources.ready();
        let applied = resources.apply(&response).and_then(|(index, next)| {
            // A new trust bundle is taken for new handshakes before it is ACKed.
            if TYPES[index] == protocol::TRUST_BUNDLE_TYPE
                && let Some(mesh) = next.mesh()
            {
                let roots = mesh.roots_pem.clone();
                mesh_tls.set_trust_bundle(roots).map_err(|e| format!("{}: {e}", protocol::TRUST_BUNDLE_NAME))?;
                if let Some(od) = on_demand {
                    od.set_mesh_cidrs(mesh.mesh_cidrs.clone());
                }
            }
            Ok((index, next))
        });
        let error = match applied {
            Ok((index, next)) => {
                *resources = next;
                let empty = response.resources.is_empty() && response.removed_resources.is_empty();
                metrics.xds_updates.with_label_values(&[&label, "ack"]).inc();
                if let Ok(generation) = response.system_version_info.parse::<i64>() {
                    metrics.xds_version.with_label_values(&[&label]).set(generation);
                }
                if resources.ready() && !(was_ready && empty) {
                    *version += 1;
                    let snapshot = Snapshot::build(
                        *version,
                        format!("xds:{}", control.addr),
                        resources.documents(),
                        &settings.namespace,
                        // Without the mesh settings resource, the mode last known stays (never a silent downgrade).
                        resources.mesh().map_or(store.load().default_mtls, |m| m.default_mtls),
                        resources.workload(),
                    )
                    .with_routes(resources.route_sets())
                    .carry_usage(&store.load());
                    tracing::info!(version = *version, type_url = %label, generation = %response.system_version_info, changed = response.resources.len(), removed = response.removed_resources.len(), services = snapshot.services.len(), "config applied");
                    store.store(snapshot);
                    metrics.config_applied("xds", *version);
                    // Waiting first calls find their destinations in the snapshot just stored.
                    if let Some(od) = on_demand.filter(|_| index == 0) {
                        od.answered(&response);
                    }
                } else {
                    tracing::debug!(type_url = %label, held = resources.types[index].len(), "response ACKed; no snapshot change (a first response, or nothing in it)");
                }
                None
            }
            Err(message) => {
                tracing::error!(type_url = %label, generation = %response.system_version_info, error = %message, "config rejected (NACK); keeping the last good config");
                metrics.xds_updates.with_label_values(&[&label, "nack"]).inc();
                metrics.config_rejected("xds");
                Some(envoy_types::pb::google::rpc::Status {
                    code: tonic::Code::InvalidArgument as i32,
                    message,
                    details: vec![],
                })
            }
        };
        let answer = DeltaDiscoveryRequest {
            type_url: response.type_url,
            response_nonce: response.nonce,
            error_detail: error,
            ..Default::default()
        };
        if tx.send(answer).await.is_err() {
            return Ok(Ended::Closed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::service::discovery::v3::Resource;
    use prost::Message;

    fn response(type_url: &str, docs: &str, removed: &[&str]) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            type_url: type_url.into(),
            resources: ferry_api::parse_documents(docs)
                .unwrap()
                .iter()
                .map(|d| Resource {
                    name: protocol::resource_name(d),
                    version: "v".into(),
                    resource: protocol::encode(d),
                    ..Default::default()
                })
                .collect(),
            removed_resources: removed.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn tp(name: &str, target: &str) -> String {
        format!(
            "apiVersion: ferry.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: {name}}}\nspec: {{targetRef: {{kind: Service, name: {target}}}, timeout: 1s}}\n"
        )
    }

    #[test]
    fn responses_apply_whole_or_not_at_all() {
        let svc = "apiVersion: ferry.dev/v1alpha1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 80}]}\n";
        let r = Resources::default();
        let (_, r) = r.apply(&response(protocol::SERVICE_TYPE, svc, &[])).unwrap();
        let (_, r) = r.apply(&response(protocol::TRAFFIC_POLICY_TYPE, &tp("one", "a"), &[])).unwrap();
        assert!(!r.ready(), "ready only once every type has answered");
        let (_, r) = r.apply(&response(protocol::AUTHORIZATION_POLICY_TYPE, "", &[])).unwrap();
        assert!(!r.ready());
        // The trust bundle: its roots must be CA certificates.
        let ca = |is_ca: bool| {
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca =
                if is_ca { rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained) } else { rcgen::IsCa::ExplicitNoCa };
            params.self_signed(&rcgen::KeyPair::generate().unwrap()).unwrap().pem()
        };
        let bundle = |roots_pem: Vec<String>| DeltaDiscoveryResponse {
            type_url: protocol::TRUST_BUNDLE_TYPE.into(),
            resources: vec![Resource {
                name: protocol::TRUST_BUNDLE_NAME.into(),
                version: "v".into(),
                resource: Some(protocol::encode_mesh(&protocol::Mesh {
                    roots_pem,
                    default_mtls: ferry_api::policy::MtlsMode::Strict,
                    mesh_cidrs: vec!["10.96.0.0/12".parse().unwrap()],
                })),
                ..Default::default()
            }],
            ..Default::default()
        };
        let err = r.apply(&bundle(vec![ca(true), ca(false)])).unwrap_err();
        assert!(err.contains("mesh: roots[1]: not a CA certificate"), "{err}");
        let err = r.apply(&bundle(vec![])).unwrap_err();
        assert!(err.contains("at least one root"), "{err}");
        // A mesh range that is not a CIDR: refused, naming it.
        let mut bad_range = bundle(vec![ca(true)]);
        let any = bad_range.resources[0].resource.as_mut().unwrap();
        any.value = ferry_api::resources::pb::TrustBundle {
            roots_pem: vec![ca(true)],
            default_mtls: 0,
            mesh_cidrs: vec!["10.96.0.0/33".into()],
        }
        .encode_to_vec();
        let err = r.apply(&bad_range).unwrap_err();
        assert!(err.contains("mesh: mesh_cidrs[0]: `10.96.0.0/33`: prefix must be 0-32"), "{err}");
        let (_, r) = r.apply(&bundle(vec![ca(true), ca(true)])).unwrap();
        assert!(!r.ready(), "not before the control plane has said what the pod serves");
        assert_eq!(r.workload().default_inbound, DefaultInbound::Deny, "no answer held: nothing served");
        let workload = |w: &Workload| DeltaDiscoveryResponse {
            type_url: protocol::WORKLOAD_TYPE.into(),
            resources: vec![Resource {
                name: "pod/default/web-1".into(),
                version: "v".into(),
                resource: Some(protocol::encode_workload(w)),
                ..Default::default()
            }],
            ..Default::default()
        };
        let (_, r) = r.apply(&workload(&Workload::default())).unwrap();
        assert!(!r.ready(), "not before the route sets' first answer (none here)");
        let routes = DeltaDiscoveryResponse { type_url: protocol::ROUTE_SET_TYPE.into(), ..Default::default() };
        let (_, r) = r.apply(&routes).unwrap();
        assert!(r.ready());
        assert_eq!(r.workload(), Workload::default());
        let mesh = r.mesh().map(|m| (m.roots_pem.len(), m.default_mtls));
        assert_eq!(mesh, Some((2, ferry_api::policy::MtlsMode::Strict)));
        assert_eq!(r.documents().len(), 2);
        // A second TrafficPolicy for the same Service: the whole response is refused, naming both.
        let err = r.apply(&response(protocol::TRAFFIC_POLICY_TYPE, &tp("two", "a"), &[])).unwrap_err();
        assert!(err.contains("default/two") && err.contains("default/one"), "{err}");
        // An invalid resource next to a valid one: neither is taken.
        let mut bad = response(protocol::SERVICE_TYPE, &svc.replace("name: a", "name: b"), &[]);
        let mut invalid = bad.resources[0].clone();
        invalid.name = "default/c".into();
        bad.resources.push(invalid);
        let err = r.apply(&bad).unwrap_err();
        assert!(err.starts_with("default/c: the resource's metadata names it default/b"), "{err}");
        // Removal.
        let (_, r) = r.apply(&response(protocol::SERVICE_TYPE, "", &["default/a"])).unwrap();
        assert_eq!(r.documents().len(), 1);
        let err = r.apply(&response("type.googleapis.com/x.Y", "", &[])).unwrap_err();
        assert!(err.contains("unknown resource type"), "{err}");
    }
}
