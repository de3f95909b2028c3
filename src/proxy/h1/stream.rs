//! `Stream`: one socket to an upstream, plain TCP or TLS, and how it is opened. What is
//! read from it and written to it is the rest of `h1`'s business.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::config::UpstreamUrl;

/// A connection to an upstream, plain or TLS, counted against the open-file limit.
pub struct Stream {
    io: Io,
    socket: crate::nofile::Counted,
}

enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Stream {
    /// A plain connection made elsewhere (tests).
    pub fn plain(tcp: TcpStream) -> Stream {
        Stream {
            io: Io::Plain(tcp),
            socket: crate::nofile::Counted::accepted(),
        }
    }

    /// Closes the connection and keeps its place under the open-file ceiling, for the
    /// connect that closed it to make room (`connect`'s `room`).
    pub fn close_keeping_room(self) -> crate::nofile::Counted {
        let Stream { io, socket } = self;
        drop(io);
        socket
    }

    /// Whether it is TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self.io, Io::Tls(_))
    }
}

/// `connect` within `limits.connect_timeout`; past it, an error of kind `TimedOut` that
/// says how long it waited.
pub async fn connect_within(
    tls: &Arc<rustls::ClientConfig>,
    url: &UpstreamUrl,
    timeout: Duration,
    room: Option<crate::nofile::Counted>,
) -> io::Result<Stream> {
    match tokio::time::timeout(timeout, connect(tls, url, room)).await {
        Ok(connected) => connected,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connect timed out after {timeout:?}"),
        )),
    }
}

/// Opens a connection to `url` (TLS for `https://`, verified with `tls`), Nagle off; an
/// error as at the open-file limit when the descriptors left are the reserve's
/// (`nofile::Counted::to_open`), unless it has `room` a closed connection left it.
pub async fn connect(
    tls: &Arc<rustls::ClientConfig>,
    url: &UpstreamUrl,
    room: Option<crate::nofile::Counted>,
) -> io::Result<Stream> {
    let socket = match room {
        Some(room) => room,
        None => crate::nofile::Counted::to_open()?,
    };
    let host = url.authority.host();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let tcp = TcpStream::connect((host, url.port())).await?;
    tcp.set_nodelay(true)?;
    crate::proxy::stall::limit_unsent(&tcp);
    if !url.is_tls() {
        return Ok(Stream {
            io: Io::Plain(tcp),
            socket,
        });
    }
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let tls = tokio_rustls::TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await?;
    Ok(Stream {
        io: Io::Tls(Box::new(tls)),
        socket,
    })
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
