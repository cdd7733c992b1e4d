//! Routing by authority (a Host header or an absolute-form target, as hyper hands them over) and the SNI's port:
//! never panic; an authority `http` accepts is routed to the host and port `http` reads; `sni_port` reads back what
//! `sni` wrote.
#![no_main]

use std::sync::LazyLock;

use ferry::discovery::snapshot::Snapshot;
use libfuzzer_sys::fuzz_target;

static SNAPSHOT: LazyLock<Snapshot> = LazyLock::new(|| {
    let yaml = "apiVersion: ferry.dev/v1alpha1\nkind: Service\nmetadata: {name: payments, namespace: shop}\n\
                spec: {ports: [{port: 8080}, {port: 9090, protocol: grpc}], addresses: [payments.example.com, \"10.96.0.7\", \"[fd00::7]\"], \
                endpoints: [{address: \"127.0.0.1:18001\"}]}\n";
    let docs = ferry_api::parse_documents(yaml).expect("the fixture parses");
    Snapshot::build(1, "fuzz".into(), docs, "default", Default::default(), Default::default())
});

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let routed = SNAPSHOT.route(text).ok().map(|r| (r.service.name.clone(), r.port.port));
    if let Ok(authority) = text.parse::<http::uri::Authority>()
        && !text.contains('@')
        && let Some((name, port)) = &routed
    {
        // What was routed is what http reads: the host and the port (80 when none).
        let host = authority.host().to_ascii_lowercase();
        let host = host.trim_end_matches('.');
        assert!(
            ["payments.example.com", "payments.shop", "payments.shop.svc.cluster.local", "10.96.0.7", "[fd00::7]"]
                .contains(&host),
            "{text:?} routed to {name} from host {host:?}"
        );
        assert_eq!(authority.port_u16().unwrap_or(80), *port, "{text:?}");
    }
    let _ = ferry::identity::tls::sni_port(text);
    if let Some((port, name)) = text.split_once('/')
        && let Ok(port) = port.parse::<u16>()
        && port != 0
    {
        let sni = ferry::identity::tls::sni(port, name, "ns");
        assert_eq!(ferry::identity::tls::sni_port(&sni), Some(port), "{sni:?}");
    }
});
