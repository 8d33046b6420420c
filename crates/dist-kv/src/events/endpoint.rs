//! Endpoint rules of vLLM's `ZmqEventPublisher`: data-parallel offsets and bind-or-connect.

use crate::error::{Error, Result};

/// vLLM's `offset_endpoint_port`: the endpoint data-parallel rank `dp_rank` uses.
///
/// Rank 0 and an empty or absent endpoint are unchanged. Otherwise an `inproc` endpoint gets the
/// suffix `_dp{rank}` and a `tcp` endpoint gets its port (after the last `:`) increased by the rank;
/// any other scheme (`ipc://` included) is an error, as in vLLM.
pub fn offset_endpoint_port(endpoint: Option<&str>, dp_rank: usize) -> Result<Option<String>> {
    let Some(ep) = endpoint else { return Ok(None) };
    if ep.is_empty() || dp_rank == 0 {
        return Ok(Some(ep.to_owned()));
    }
    if ep.contains("inproc") {
        return Ok(Some(format!("{ep}_dp{dp_rank}")));
    }
    if ep.contains("tcp") {
        let Some(colon) = ep.rfind(':') else {
            return Ok(Some(ep.to_owned()));
        };
        let (base, port) = (&ep[..colon], &ep[colon + 1..]);
        let port: u32 = port.parse().map_err(|_| {
            Error::InvalidArgument(format!(
                "endpoint {ep:?}: port {port:?} is not a number, so it cannot be offset by data-parallel rank {dp_rank}"
            ))
        })?;
        let new_port = u64::from(port) + dp_rank as u64;
        if new_port > 65_535 {
            return Err(Error::InvalidArgument(format!(
                "endpoint {ep:?}: port {port} + data-parallel rank {dp_rank} exceeds 65535"
            )));
        }
        return Ok(Some(format!("{base}:{new_port}")));
    }
    Err(Error::InvalidArgument(format!(
        "invalid endpoint {ep:?}: with data-parallel rank {dp_rank} > 0 it must contain 'inproc' or 'tcp'"
    )))
}

/// vLLM's rule for the PUB socket: bind when the endpoint has a wildcard (`*`), an IPv6 `::`, or is
/// `ipc://` or `inproc://`; connect otherwise ("bind stable, connect volatile").
pub fn should_bind(endpoint: &str) -> bool {
    endpoint.contains('*')
        || endpoint.contains("::")
        || endpoint.starts_with("ipc://")
        || endpoint.starts_with("inproc://")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_like_vllm() {
        let off = |e: &str, r| offset_endpoint_port(Some(e), r).unwrap().unwrap();
        assert_eq!(off("tcp://*:5557", 0), "tcp://*:5557");
        assert_eq!(off("tcp://*:5557", 1), "tcp://*:5558");
        assert_eq!(off("tcp://localhost:5557", 3), "tcp://localhost:5560");
        assert_eq!(off("tcp://[::1]:5557", 2), "tcp://[::1]:5559");
        assert_eq!(off("inproc://cache", 2), "inproc://cache_dp2");
        assert_eq!(off("ipc:///tmp/x", 0), "ipc:///tmp/x");
        assert!(offset_endpoint_port(Some("ipc:///tmp/x"), 1).is_err());
        assert!(offset_endpoint_port(Some("tcp://*:*"), 1).is_err());
        assert!(offset_endpoint_port(Some("tcp://*:65535"), 1).is_err());
        assert_eq!(offset_endpoint_port(None, 5).unwrap(), None);
        assert_eq!(
            offset_endpoint_port(Some(""), 5).unwrap().as_deref(),
            Some("")
        );
    }

    #[test]
    fn bind_or_connect() {
        assert!(should_bind("tcp://*:5557"));
        assert!(should_bind("tcp://[::]:5557"));
        assert!(should_bind("ipc:///tmp/kv"));
        assert!(should_bind("inproc://kv"));
        assert!(!should_bind("tcp://127.0.0.1:5557"));
        assert!(!should_bind("tcp://router.example:5557"));
    }
}
