//! TorchServe's inference routes → (model, version). FACTS.md §4 is the source of every rule here.
//!
//! Every response is routed, so a route borrows from the request target wherever it can: only a
//! percent-escaped name is decoded into a string of its own.

use std::borrow::Cow;

/// What a request addresses, as far as metrics are concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route<'a> {
    /// An inference call on a model. `version` is the URL's version segment or `default`, exactly as
    /// TorchServe labels `model_version` (FACTS.md §3).
    Inference {
        model: Cow<'a, str>,
        version: Cow<'a, str>,
    },
    /// `/invocations` without a `model_name` (TorchServe answers 400).
    InferenceWithoutModel,
    /// Anything else: `/ping`, management, metrics, unknown paths.
    Other,
}

/// The `model_version` label value for a URL without a version segment.
pub const DEFAULT_VERSION: &str = "default";

impl<'a> Route<'a> {
    fn inference(model: Cow<'a, str>, version: Option<&'a str>) -> Self {
        if model.is_empty() {
            return Route::Other;
        }
        Route::Inference {
            model,
            version: version
                .filter(|v| !v.is_empty())
                .map_or(Cow::Borrowed(DEFAULT_VERSION), percent_decode),
        }
    }
}

/// Maps a request target (path and query, as on the request line) to its route.
pub fn route(target: &str) -> Route<'_> {
    // Absolute-form targets (`http://host/path`) are legal HTTP/1.1; keep only the path.
    let target = strip_authority(target);
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    // No route below has more than four segments, so five are enough to tell every one from a longer
    // path, and fit on the stack.
    let mut segs = [""; 5];
    let mut n = 0;
    for seg in path.split('/').filter(|s| !s.is_empty()).take(segs.len()) {
        segs[n] = seg;
        n += 1;
    }
    match &segs[..n] {
        // /predictions/{m}[/{v}[/any/extra]] and /explanations/{m}[/{v}...]
        ["predictions" | "explanations", m, rest @ ..] => {
            Route::inference(percent_decode(m), rest.first().copied())
        }
        // /v1/models/{m}:predict, /v1/models/{m}:explain
        ["v1", "models", m] => match m.rsplit_once(':') {
            Some((m, "predict" | "explain")) => Route::inference(percent_decode(m), None),
            _ => Route::Other,
        },
        // /v2/models/{m}/infer, /v2/models/{m}/explain
        ["v2", "models", m, "infer" | "explain"] => Route::inference(percent_decode(m), None),
        // /invocations?model_name={m}
        ["invocations"] => match query_param(query, "model_name") {
            Some(m) if !m.is_empty() => Route::inference(m, None),
            _ => Route::InferenceWithoutModel,
        },
        // /models/{m}/invoke (management-style path on the inference port)
        ["models", m, "invoke"] => Route::inference(percent_decode(m), None),
        // /{m}/predict, /{m}/{v}/predict
        [m, "predict"] => Route::inference(percent_decode(m), None),
        [m, v, "predict"] => Route::inference(percent_decode(m), Some(v)),
        _ => Route::Other,
    }
}

fn strip_authority(target: &str) -> &str {
    for scheme in ["http://", "https://"] {
        if let Some(rest) = target.strip_prefix(scheme) {
            return rest.find('/').map_or("/", |i| &rest[i..]);
        }
    }
    target
}

/// First value of `key` in a query string, percent-decoded.
fn query_param<'a>(query: &'a str, key: &str) -> Option<Cow<'a, str>> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k) == key).then(|| percent_decode(v))
    })
}

/// Percent-decoding (and `+` as space in queries is not applied: TorchServe's QueryStringDecoder keeps
/// path semantics for path segments). Invalid escapes are kept verbatim; invalid UTF-8 is replaced.
pub fn percent_decode(s: &str) -> Cow<'_, str> {
    if !s.contains('%') {
        return Cow::Borrowed(s);
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) = (
                bytes.get(i + 1).and_then(|c| (*c as char).to_digit(16)),
                bytes.get(i + 2).and_then(|c| (*c as char).to_digit(16)),
            )
        {
            // Two hex digits: the value fits a byte.
            out.push(u8::try_from(h * 16 + l).unwrap_or(b'?'));
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inf<'a>(model: &'a str, version: &'a str) -> Route<'a> {
        Route::Inference {
            model: model.into(),
            version: version.into(),
        }
    }

    /// Every inference route of FACTS.md §4, with the labels TorchServe gives it.
    #[test]
    fn every_torchserve_route() {
        let cases = [
            ("/predictions/echo", inf("echo", "default")),
            ("/predictions/echo/1.0", inf("echo", "1.0")),
            ("/predictions/echo/1.0/extra/path", inf("echo", "1.0")),
            ("/predictions/echo/", inf("echo", "default")),
            ("/explanations/echo", inf("echo", "default")),
            ("/explanations/echo/2.0", inf("echo", "2.0")),
            ("/v1/models/echo:predict", inf("echo", "default")),
            ("/v1/models/echo:explain", inf("echo", "default")),
            ("/v2/models/echo/infer", inf("echo", "default")),
            ("/v2/models/echo/explain", inf("echo", "default")),
            ("/invocations?model_name=echo", inf("echo", "default")),
            (
                "/invocations?x=1&model_name=my%20model",
                inf("my model", "default"),
            ),
            ("/invocations", Route::InferenceWithoutModel),
            ("/invocations?model_name=", Route::InferenceWithoutModel),
            ("/models/echo/invoke", inf("echo", "default")),
            ("/echo/predict", inf("echo", "default")),
            ("/echo/1.0/predict", inf("echo", "1.0")),
            ("/predictions/echo?x=1", inf("echo", "default")),
            (
                "http://127.0.0.1:8080/predictions/echo",
                inf("echo", "default"),
            ),
        ];
        for (target, want) in cases {
            assert_eq!(route(target), want, "{target}");
        }
    }

    #[test]
    fn non_inference_routes() {
        for target in [
            "/ping",
            "/metrics",
            "/models",
            "/models/echo",
            "/models/echo/1.0",
            "/no/such/route",
            "/predictions",
            "/predictions/",
            "/v1/models/echo",
            "/v1/models/echo:status",
            // Longer than the route they begin with.
            "/v2/models/echo/infer/extra",
            "/models/echo/invoke/extra",
            "/echo/1.0/predict/extra",
            "/a/b/c/d/e/f/predict",
            "/v2/models/echo",
            "/",
            "",
            "*",
        ] {
            assert_eq!(route(target), Route::Other, "{target}");
        }
    }

    #[test]
    fn percent_decoding_is_total() {
        assert_eq!(percent_decode("a%2Fb"), "a/b");
        assert_eq!(percent_decode("bad%zz%"), "bad%zz%");
        assert_eq!(percent_decode("%ff"), "\u{fffd}");
    }
}
