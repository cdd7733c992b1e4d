//! HTTPRoute `RequestRedirect` and `URLRewrite`, as pure functions of the request's authority and URI: the
//! redirect's `Location`, and the host and path a rewritten request goes on with.

use ferry_api::route::{RequestRedirect, UrlRewrite};
use http::Uri;

/// The well-known port of a scheme (left out of a `Location`).
fn default_port(scheme: &str) -> u16 {
    if scheme == "https" { 443 } else { 80 }
}

/// Pure: the `Location` of a redirect of the request to `authority` + `uri` (`prefix`: the `PathPrefix` value it
/// matched). Unset parts are the request's; a `scheme` without a `port` takes the scheme's well-known port.
pub fn location(r: &RequestRedirect, authority: &str, uri: &Uri, prefix: Option<&str>) -> String {
    let scheme = r.scheme.as_deref().unwrap_or("http");
    let (host, port) = ferry_api::split_host_port(authority);
    let host = r.hostname.as_deref().unwrap_or(host);
    let port = match (r.port, &r.scheme) {
        (Some(p), _) => Some(p),
        (None, Some(_)) => None,
        (None, None) => port.and_then(|p| p.parse::<u16>().ok()),
    }
    .filter(|p| *p != default_port(scheme));
    let path = r.path.as_ref().map_or_else(|| uri.path().to_string(), |m| m.apply(uri.path(), prefix));
    let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    match port {
        Some(port) => format!("{scheme}://{host}:{port}{path}{query}"),
        None => format!("{scheme}://{host}{path}{query}"),
    }
}

/// Pure: the authority and path-and-query a rewritten request goes on with (`None`: unchanged).
pub fn rewritten(r: &UrlRewrite, uri: &Uri, prefix: Option<&str>) -> (Option<String>, Option<String>) {
    let path = r.path.as_ref().map(|m| {
        let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
        format!("{}{query}", m.apply(uri.path(), prefix))
    });
    (r.hostname.clone(), path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_api::route::{PathModifier, PathModifierType};

    fn prefix(with: &str) -> Option<PathModifier> {
        Some(PathModifier {
            kind: PathModifierType::ReplacePrefixMatch,
            replace_full_path: None,
            replace_prefix_match: Some(with.into()),
        })
    }

    #[test]
    fn redirect_locations() {
        let uri: Uri = "/old/a?x=1".parse().unwrap();
        let r = |scheme: Option<&str>, hostname: Option<&str>, port: Option<u16>, path| RequestRedirect {
            scheme: scheme.map(str::to_string),
            hostname: hostname.map(str::to_string),
            path,
            port,
            status_code: None,
        };
        // (redirect, request authority, Location)
        let cases = [
            (r(None, None, None, prefix("/new")), "api:8080", "http://api:8080/new/a?x=1"),
            (r(Some("https"), Some("example.com"), None, None), "api:8080", "https://example.com/old/a?x=1"),
            (r(Some("https"), None, Some(8443), None), "api", "https://api:8443/old/a?x=1"),
            (r(None, None, Some(80), None), "api:8080", "http://api/old/a?x=1"),
            (r(None, Some("b.example"), None, None), "api", "http://b.example/old/a?x=1"),
        ];
        for (redirect, authority, want) in cases {
            assert_eq!(location(&redirect, authority, &uri, Some("/old")), want, "{redirect:?}");
        }
    }

    #[test]
    fn rewrites_keep_the_query() {
        let uri: Uri = "/api/headers?x=1".parse().unwrap();
        let r = UrlRewrite { hostname: Some("internal.example".into()), path: prefix("/") };
        assert_eq!(rewritten(&r, &uri, Some("/api")), (Some("internal.example".into()), Some("/headers?x=1".into())));
        let none = UrlRewrite { hostname: None, path: None };
        assert_eq!(rewritten(&none, &uri, Some("/api")), (None, None));
    }
}
