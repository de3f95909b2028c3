//! Unit tests of the HTTP/1.1 upstream client: the request head it writes, kept
//! connections the upstream closed, and the framing it accepts.

use http::header::{self, HeaderMap, HeaderValue};
use tokio::net::TcpStream;

use super::body::{Decode, step};
use super::head::parse_head;
use super::*;

#[test]
fn the_head_carries_one_of_each_forwarding_header() {
    let mut headers = HeaderMap::new();
    headers.insert(header::HOST, HeaderValue::from_static("api.example"));
    headers.append("x-forwarded-for", HeaderValue::from_static("10.1.1.1"));
    headers.append("x-forwarded-for", HeaderValue::from_static(" "));
    headers.append("x-forwarded-for", HeaderValue::from_static("10.2.2.2 "));
    headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    headers.insert("x-forwarded-host", HeaderValue::from_static("spoofed"));
    headers.insert("dg-thing", HeaderValue::from_static("x"));
    let client = HeaderValue::from_static("127.0.0.9");
    let host = HeaderValue::from_static("api.example");
    let (method, path) = (Method::GET, PathAndQuery::from_static("/v1/status"));
    let head = |headers, forwarding| RequestHead {
        method: &method,
        path: &path,
        headers,
        forwarding,
    };
    let authority = Authority::from_static("10.0.0.1:8080");
    let encoded = encode_head(
        &head(
            &headers,
            Forwarding {
                client: &client,
                tls: true,
                host: Some(&host),
            },
        ),
        &authority,
        Framing::Empty,
    );
    assert_eq!(
        std::str::from_utf8(&encoded).expect("ASCII"),
        "GET /v1/status HTTP/1.1\r\nhost: 10.0.0.1:8080\r\ndg-thing: x\r\n\
         x-forwarded-for: 10.1.1.1, 10.2.2.2, 127.0.0.9\r\nx-forwarded-proto: https\r\n\
         x-forwarded-host: api.example\r\n\r\n"
    );
    let none = HeaderMap::new();
    let encoded = encode_head(
        &head(
            &none,
            Forwarding {
                client: &client,
                tls: false,
                host: None,
            },
        ),
        &authority,
        Framing::Empty,
    );
    assert_eq!(
        std::str::from_utf8(&encoded).expect("ASCII"),
        "GET /v1/status HTTP/1.1\r\nhost: 10.0.0.1:8080\r\n\
         x-forwarded-for: 127.0.0.9\r\nx-forwarded-proto: http\r\n\r\n"
    );
}

#[tokio::test]
async fn sweep_closes_kept_connections_the_upstream_closed() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    let idle = Idle::default();
    let (kept, closed) = (
        TcpStream::connect(addr).await.expect("connect"),
        TcpStream::connect(addr).await.expect("connect"),
    );
    let (_peer_of_kept, _) = listener.accept().await.expect("accept");
    let (peer_of_closed, _) = listener.accept().await.expect("accept");
    idle.park(Conn::new(Stream::plain(kept), None));
    idle.park(Conn::new(Stream::plain(closed), None));
    drop(peer_of_closed);
    // The close reaches the reactor when it next turns; sweep until it has.
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            idle.sweep();
            if idle.len() == 1 {
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the closed connection is swept");
    let trust = crate::tls::upstream_client_config(&Default::default(), false).expect("trust");
    assert!(
        idle.take(&trust).is_some(),
        "the open one is kept and reusable"
    );
}

/// At the open-file ceiling a request that needs a socket closes the connection kept
/// idle longest (`proxy::close_an_idle_connection`): it is closed, and the others stay.
#[tokio::test]
async fn close_oldest_closes_the_connection_kept_longest() {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    let idle = Idle::default();
    assert!(
        idle.close_oldest().is_none(),
        "nothing kept, nothing closed"
    );
    let oldest = TcpStream::connect(addr).await.expect("connect");
    let (mut peer_of_oldest, _) = listener.accept().await.expect("accept");
    let newest = TcpStream::connect(addr).await.expect("connect");
    let (_peer_of_newest, _) = listener.accept().await.expect("accept");
    idle.park(Conn::new(Stream::plain(oldest), None));
    idle.park(Conn::new(Stream::plain(newest), None));
    assert!(idle.close_oldest().is_some());
    assert_eq!(idle.len(), 1);
    let read = tokio::time::timeout(Duration::from_secs(10), peer_of_oldest.read(&mut [0u8; 8]))
        .await
        .expect("the close in time");
    assert_eq!(read.expect("read"), 0, "the oldest was closed");
    assert!(idle.close_oldest().is_some());
    assert!(idle.is_empty());
}

#[test]
fn lengths_and_chunk_sizes_are_digits_only() {
    assert_eq!(decimal("42"), Some(42));
    assert_eq!(decimal("+42"), None);
    assert_eq!(decimal(""), None);
    let mut buf = BytesMut::from(&b"0000000000000000a\r\n"[..]);
    let mut decode = Decode::ChunkSize;
    assert!(step(&mut decode, &mut buf).is_ok());
    assert_eq!(
        decode,
        Decode::ChunkData(10),
        "leading zeros are not digits that count"
    );
    let mut buf = BytesMut::from(&b"+a\r\n"[..]);
    assert!(step(&mut Decode::ChunkSize, &mut buf).is_err());
}

#[test]
fn a_response_with_both_framings_is_answered_but_its_connection_not_kept() {
    let mut buf = BytesMut::from(
        &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n"[..],
    );
    let (response, framing, keep) = parse_head(&mut buf, &Method::GET, false)
        .expect("valid")
        .expect("complete");
    assert_eq!(framing, Framing::Chunked);
    assert!(!keep);
    assert!(!response.headers().contains_key(header::CONTENT_LENGTH));
}

/// An upstream a reload removed keeps no connection: neither those parked when it was
/// removed nor those its requests still running finish with later (its health loop, which
/// would sweep them, has stopped). Put back in its pool, it keeps them again.
#[tokio::test]
async fn a_closed_idle_set_keeps_nothing_until_opened() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    let idle = Idle::default();
    let mut peers = Vec::new();
    let mut connect = async || {
        let conn = TcpStream::connect(addr).await.expect("connect");
        peers.push(listener.accept().await.expect("accept"));
        Conn::new(Stream::plain(conn), None)
    };
    idle.park(connect().await);
    assert_eq!(idle.len(), 1);
    idle.close();
    assert_eq!(idle.len(), 0, "the parked one is closed");
    idle.park(connect().await);
    assert_eq!(idle.len(), 0, "one finished after the removal is not kept");
    idle.open();
    idle.park(connect().await);
    assert_eq!(idle.len(), 1, "put back, it keeps them again");
}

/// A head with more fields than are parsed is refused for what it is, not as "not HTTP".
#[test]
fn a_head_with_too_many_fields_is_named_so() {
    let mut head = b"HTTP/1.1 200 OK\r\n".to_vec();
    for i in 0..=MAX_HEADERS {
        head.extend_from_slice(format!("x-field-{i}: {i}\r\n").as_bytes());
    }
    head.extend_from_slice(b"\r\n");
    let mut buf = BytesMut::from(&head[..]);
    let error = parse_head(&mut buf, &Method::GET, false).expect_err("too many fields");
    assert_eq!(
        error,
        format!("the upstream's answer has more than {MAX_HEADERS} header fields")
    );
}
