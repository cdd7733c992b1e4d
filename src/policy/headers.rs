//! HTTPRoute header filters: a rule's `RequestHeaderModifier` and `ResponseHeaderModifier` applied to a header map
//! (set replaces every value of the name, then add appends, then remove; validation refused Ferry's own headers and
//! a name both changed and removed).

use ferry_api::route::{HeaderModifier, HttpRouteFilter};
use http::header::{HeaderMap, HeaderName, HeaderValue};

/// Which of a filter's modifiers applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Request,
    Response,
}

/// Pure: `headers` changed by the `side` modifiers of `filters`, in their order.
pub fn apply(filters: &[HttpRouteFilter], side: Side, headers: &mut HeaderMap) {
    for f in filters {
        let modifier = match side {
            Side::Request => f.request_header_modifier.as_ref(),
            Side::Response => f.response_header_modifier.as_ref(),
        };
        if let Some(m) = modifier {
            modify(m, headers);
        }
    }
}

fn modify(m: &HeaderModifier, headers: &mut HeaderMap) {
    // Validated names and values: one that still does not parse is skipped rather than failing the request.
    let pair = |name: &str, value: &str| {
        Some((HeaderName::from_bytes(name.as_bytes()).ok()?, HeaderValue::from_str(value).ok()?))
    };
    for (name, value) in m.set.iter().filter_map(|h| pair(&h.name, &h.value)) {
        headers.insert(name, value);
    }
    for (name, value) in m.add.iter().filter_map(|h| pair(&h.name, &h.value)) {
        headers.append(name, value);
    }
    for name in m.remove.iter().filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok()) {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_api::route::HeaderPair;

    fn pairs(list: &[(&str, &str)]) -> Vec<HeaderPair> {
        list.iter().map(|(n, v)| HeaderPair { name: n.to_string(), value: v.to_string() }).collect()
    }

    #[test]
    fn modifiers_set_add_and_remove_on_their_side_only() {
        let filter = |kind: &str, m: HeaderModifier| HttpRouteFilter {
            kind: kind.into(),
            request_header_modifier: (kind == "RequestHeaderModifier").then(|| m.clone()),
            response_header_modifier: (kind == "ResponseHeaderModifier").then_some(m),
            request_redirect: None,
            url_rewrite: None,
            request_mirror: None,
        };
        let request = HeaderModifier {
            set: pairs(&[("X-Env", "canary")]),
            add: pairs(&[("x-tag", "a")]),
            remove: vec!["X-Secret".into()],
        };
        let response = HeaderModifier { set: pairs(&[("x-served-by", "route")]), ..Default::default() };
        let filters = [filter("RequestHeaderModifier", request), filter("ResponseHeaderModifier", response)];
        // (side, headers before, what must be there after (name, values), what must be gone)
        type Case<'a> = (Side, &'a [(&'a str, &'a str)], &'a [(&'a str, &'a [&'a str])], &'a [&'a str]);
        let cases: &[Case] = &[
            (
                Side::Request,
                &[("x-env", "prod"), ("x-env", "eu"), ("x-tag", "b"), ("x-secret", "1"), ("x-other", "kept")],
                &[("x-env", &["canary"]), ("x-tag", &["b", "a"]), ("x-other", &["kept"])],
                &["x-secret", "x-served-by"],
            ),
            (Side::Response, &[("x-secret", "1")], &[("x-served-by", &["route"]), ("x-secret", &["1"])], &["x-env"]),
        ];
        for (side, before, present, absent) in cases {
            let mut headers = HeaderMap::new();
            for (n, v) in *before {
                headers.append(HeaderName::from_bytes(n.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
            }
            apply(&filters, *side, &mut headers);
            for (name, values) in *present {
                let got: Vec<&str> = headers.get_all(*name).iter().map(|v| v.to_str().unwrap()).collect();
                assert_eq!(got, *values, "{side:?} {name}");
            }
            for name in *absent {
                assert!(!headers.contains_key(*name), "{side:?} {name}");
            }
        }
    }
}
