//! Redis, for the harnesses that measure Squall against it: a `redis-server` of its own on a
//! free loopback port with the durability asked for ([`start`]), and a minimal RESP client
//! ([`Redis`]): one connection, one command at a time, plus reading pushed Pub/Sub messages.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use squall_proto::poll::Poll;

/// A server process, killed when dropped.
pub struct Server {
    /// The process.
    pub child: Child,
}

impl Server {
    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port free now.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Starts `binary` on a free port with its append-only file in `data`, synced as
/// `appendfsync` says (`always` or `everysec`), with `extra` settings (`--name value` pairs);
/// waits until it answers PING.
pub fn start(
    binary: &Path,
    data: &Path,
    appendfsync: &str,
    extra: &[&str],
) -> anyhow::Result<(Server, u16)> {
    std::fs::create_dir_all(data)?;
    let port = free_port()?;
    let child = Command::new(binary)
        .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .args(["--save", "", "--appendonly", "yes"])
        .args(["--appendfsync", appendfsync])
        .arg("--dir")
        .arg(data)
        .args(["--protected-mode", "no", "--loglevel", "warning"])
        .args(extra)
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {} (install redis-server)", binary.display()))?;
    let server = Server { child };
    Poll::within(Duration::from_secs(10))
        .every(Duration::from_millis(50))
        .until(|| {
            let mut redis = Redis::connect(port).ok()?;
            redis.command(&[b"PING"]).ok()
        })
        .context("redis-server did not answer PING within 10 s")?;
    Ok((server, port))
}

/// A minimal RESP client.
pub struct Redis {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    request: Vec<u8>,
    line: Vec<u8>,
    /// The last bulk reply (with its CRLF).
    pub reply: Vec<u8>,
}

impl Redis {
    /// Connects to a server on loopback.
    pub fn connect(port: u16) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(Self {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            request: Vec::with_capacity(512),
            line: Vec::with_capacity(64),
            reply: Vec::with_capacity(512),
        })
    }

    /// Sends a command without reading its reply.
    pub fn send(&mut self, args: &[&[u8]]) -> anyhow::Result<()> {
        self.request.clear();
        write!(self.request, "*{}\r\n", args.len())?;
        for arg in args {
            write!(self.request, "${}\r\n", arg.len())?;
            self.request.extend_from_slice(arg);
            self.request.extend_from_slice(b"\r\n");
        }
        self.writer.write_all(&self.request)?;
        Ok(())
    }

    /// Sends a command and reads its reply; a bulk reply is left in `self.reply` (its
    /// length answered).
    pub fn command(&mut self, args: &[&[u8]]) -> anyhow::Result<Option<usize>> {
        self.send(args)?;
        self.line.clear();
        self.reader.read_until(b'\n', &mut self.line)?;
        match self.line.first() {
            Some(b'+') | Some(b':') => Ok(None),
            Some(b'$') => {
                let len: i64 = std::str::from_utf8(&self.line[1..])?.trim().parse()?;
                if len < 0 {
                    bail!("key not found");
                }
                self.reply.resize(len as usize + 2, 0);
                self.reader.read_exact(&mut self.reply)?;
                Ok(Some(len as usize))
            }
            _ => bail!("redis error: {}", String::from_utf8_lossy(&self.line)),
        }
    }

    /// Reads one pushed message (a Pub/Sub array of bulk strings and integers), as its
    /// elements' text.
    pub fn read_message(&mut self) -> anyhow::Result<Vec<String>> {
        self.line.clear();
        self.reader.read_until(b'\n', &mut self.line)?;
        let Some(b'*') = self.line.first() else {
            bail!("not a message: {}", String::from_utf8_lossy(&self.line));
        };
        let count: usize = std::str::from_utf8(&self.line[1..])?.trim().parse()?;
        let mut elements = Vec::with_capacity(count);
        for _ in 0..count.min(16) {
            self.line.clear();
            self.reader.read_until(b'\n', &mut self.line)?;
            match self.line.first() {
                Some(b'$') => {
                    let len: usize = std::str::from_utf8(&self.line[1..])?.trim().parse()?;
                    let mut bulk = vec![0; len + 2];
                    self.reader.read_exact(&mut bulk)?;
                    bulk.truncate(len);
                    elements.push(String::from_utf8_lossy(&bulk).into_owned());
                }
                Some(b':') => {
                    elements.push(String::from_utf8_lossy(&self.line[1..]).trim().to_string())
                }
                _ => bail!(
                    "unexpected element: {}",
                    String::from_utf8_lossy(&self.line)
                ),
            }
        }
        Ok(elements)
    }

    /// Sets how long a read may wait.
    pub fn read_timeout(&mut self, wait: Option<Duration>) -> anyhow::Result<()> {
        self.writer.set_read_timeout(wait)?;
        Ok(())
    }
}
