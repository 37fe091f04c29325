//! A small QMP (QEMU Machine Protocol) client: JSON lines over a Unix socket.
//!
//! One command at a time; asynchronous events that arrive meanwhile are kept (with QEMU's
//! own timestamp) for [`Qmp::wait_event`]. Every read is bounded in time. Each command
//! carries an `id`, and an answer with another one (to a command whose wait timed out) is
//! passed over. With out-of-band execution negotiated ([`Qmp::connect_oob`]), the few
//! commands QEMU runs outside its main thread ([`Qmp::execute_oob`]: `migrate-recover`,
//! `migrate-pause`) are answered while that thread is blocked, as a post-copy destination's
//! can be on a page still at the source.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// Longest line accepted from QEMU (its replies are small; a runaway peer must not grow us).
const MAX_LINE: usize = 1 << 20;

/// What went wrong talking QMP.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// Cannot connect to the monitor socket.
    #[error("cannot connect to the QMP socket {path}: {source}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Reading or writing failed, or QEMU closed the monitor.
    #[error("QMP connection to {path}: {what}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// What happened.
        what: String,
    },
    /// Nothing came in time.
    #[error("QMP {path}: no answer to {what} within {timeout:?}")]
    Timeout {
        /// The socket.
        path: PathBuf,
        /// The command or event waited for.
        what: String,
        /// How long.
        timeout: Duration,
    },
    /// QEMU answered with an error.
    #[error("QMP {command}: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QEMU's error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// Not QMP.
    #[error("QMP {path}: unexpected message: {line}")]
    Protocol {
        /// The socket.
        path: PathBuf,
        /// What came.
        line: String,
    },
}

/// An asynchronous event.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    /// `STOP`, `RESUME`, `MIGRATION`, ...
    pub name: String,
    /// When QEMU says it happened (host clock).
    pub at: SystemTime,
    /// The event's `data` member (`Null` when absent).
    pub data: Value,
}

/// Called with each event as it is read, whatever the read was for (see [`Qmp::on_event`]).
pub type EventHook = Box<dyn FnMut(&QmpEvent) + Send>;

/// A connected, negotiated QMP monitor.
pub struct Qmp {
    path: PathBuf,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    events: VecDeque<QmpEvent>,
    hook: Option<EventHook>,
    timeout: Duration,
    /// Bytes of a line not complete yet; kept across timed-out reads (read_until appends as
    /// it goes, so a read cut short by a timeout loses nothing).
    partial: Vec<u8>,
    /// The rest of a line longer than the limit is being skipped (its message was reported
    /// as an error): the monitor stays usable after it.
    skipping: bool,
    /// The id of the next command.
    next_id: u64,
    /// Out-of-band execution was negotiated.
    oob: bool,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp")
            .field("path", &self.path)
            .field("events", &self.events.len())
            .field("hook", &self.hook.is_some())
            .finish_non_exhaustive()
    }
}

impl Qmp {
    /// The monitor socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Connects to the monitor at `path`, reads the greeting and leaves capabilities
    /// negotiation mode. Each later answer must come within `timeout`.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        Self::connect_with(path, timeout, false).await
    }

    /// As [`Qmp::connect`], with out-of-band execution turned on when QEMU offers it (a
    /// monitor on a socket does): see [`Qmp::execute_oob`].
    pub async fn connect_oob(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        Self::connect_with(path, timeout, true).await
    }

    /// Whether out-of-band execution was negotiated.
    pub fn oob(&self) -> bool {
        self.oob
    }

    async fn connect_with(path: &Path, timeout: Duration, oob: bool) -> Result<Self, QmpError> {
        let stream = tokio::time::timeout(timeout, UnixStream::connect(path))
            .await
            .map_err(|_| QmpError::Timeout {
                path: path.to_path_buf(),
                what: "connect".into(),
                timeout,
            })?
            .map_err(|source| QmpError::Connect {
                path: path.to_path_buf(),
                source,
            })?;
        let (r, w) = stream.into_split();
        let mut qmp = Self {
            path: path.to_path_buf(),
            reader: BufReader::new(r),
            writer: w,
            events: VecDeque::new(),
            hook: None,
            timeout,
            partial: Vec::new(),
            skipping: false,
            next_id: 1,
            oob: false,
        };
        let greeting = qmp.read_message("greeting", timeout).await?;
        let Some(offered) = greeting.get("QMP") else {
            return Err(QmpError::Protocol {
                path: qmp.path.clone(),
                line: greeting.to_string(),
            });
        };
        let offered = offered
            .get("capabilities")
            .and_then(Value::as_array)
            .is_some_and(|c| c.iter().any(|c| c == "oob"));
        if oob && offered {
            qmp.execute("qmp_capabilities", Some(json!({"enable": ["oob"]})))
                .await?;
            qmp.oob = true;
        } else {
            qmp.execute("qmp_capabilities", None).await?;
        }
        Ok(qmp)
    }

    /// Runs `command` out of band (QEMU runs it at once, outside its main thread) when that
    /// was negotiated, in band otherwise; returns its `return` value.
    pub async fn execute_oob(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let key = if self.oob { "exec-oob" } else { "execute" };
        self.send(key, command, arguments).await
    }

    /// Runs `command` with `arguments` and returns its `return` value.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        self.send("execute", command, arguments).await
    }

    async fn send(
        &mut self,
        key: &str,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let id = format!("dwcp-{}", self.next_id);
        self.next_id += 1;
        let mut msg = Map::new();
        msg.insert(key.into(), Value::String(command.into()));
        if let Some(a) = arguments {
            msg.insert("arguments".into(), a);
        }
        msg.insert("id".into(), Value::String(id.clone()));
        let mut line = Value::Object(msg).to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .await
            .map_err(|e| self.io(format!("cannot send {command}: {e}")))?;
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let m = self.read_message(command, left).await?;
            // The answer to an earlier command whose wait timed out (QEMU echoes the id; a
            // monitor that does not is taken at its word).
            if let Some(other) = m.get("id")
                && other.as_str() != Some(id.as_str())
            {
                continue;
            }
            if let Some(r) = m.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = m.get("error") {
                let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                return Err(QmpError::Command {
                    command: command.into(),
                    class: s("class"),
                    desc: s("desc"),
                });
            }
            // Anything else is an event; read_message has queued it.
        }
    }

    /// Calls `hook` with every event from now on, the moment it is read: also while a command
    /// waits for its answer. QEMU holds a command's answer while it completes a migration, but
    /// sends its `STOP` event at once; a caller that must act on the pause cannot wait for the
    /// answer. The events are queued as before. `None` removes the hook.
    pub fn on_event(&mut self, hook: Option<EventHook>) {
        self.hook = hook;
    }

    /// `query-status`'s `status` (`running`, `paused`, `inmigrate`, `postmigrate`, ...).
    pub async fn status(&mut self) -> Result<String, QmpError> {
        let r = self.execute("query-status", None).await?;
        Ok(r.get("status")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string())
    }

    /// The first queued or arriving event named `name`, waiting at most `timeout`.
    pub async fn wait_event(
        &mut self,
        name: &str,
        timeout: Duration,
    ) -> Result<QmpEvent, QmpError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(i) = self.events.iter().position(|e| e.name == name)
                && let Some(e) = self.events.remove(i)
            {
                return Ok(e);
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let m = self.read_message(name, left).await?;
            // (A late answer, to a command whose wait timed out, is passed over.)
            if m.get("id").is_none() && (m.get("return").is_some() || m.get("error").is_some()) {
                return Err(QmpError::Protocol {
                    path: self.path.clone(),
                    line: m.to_string(),
                });
            }
        }
    }

    /// Whether the latest queued event among `names` is `name` (does not wait, takes
    /// nothing): e.g. `latest_is("STOP", &["STOP", "RESUME"])`, the guest paused now as far as
    /// the events read so far tell.
    pub fn latest_is(&self, name: &str, names: &[&str]) -> bool {
        self.events
            .iter()
            .rev()
            .find(|e| names.contains(&e.name.as_str()))
            .is_some_and(|e| e.name == name)
    }

    /// The latest queued event named `name`, taken with every earlier one of that name, if the
    /// latest queued event among `names` is of that name (does not wait): e.g. the STOP that
    /// paused the guest for good, not one an operator's `cont` undid meanwhile.
    pub fn take_latest(&mut self, name: &str, names: &[&str]) -> Option<QmpEvent> {
        if !self.latest_is(name, names) {
            return None;
        }
        let i = self.events.iter().rposition(|e| e.name == name)?;
        let e = self.events.remove(i);
        self.events.retain(|e| e.name != name);
        e
    }

    /// A queued event named `name`, if one came already (does not wait).
    pub fn take_event(&mut self, name: &str) -> Option<QmpEvent> {
        let i = self.events.iter().position(|e| e.name == name)?;
        self.events.remove(i)
    }

    /// Reads messages that are already waiting (queueing events), for at most `within`.
    pub async fn poll_events(&mut self, within: Duration) -> Result<(), QmpError> {
        loop {
            match self.read_message("events", within).await {
                // Events, and late answers to commands whose wait timed out.
                Ok(m) if m.get("event").is_some() || m.get("id").is_some() => continue,
                Ok(m) => {
                    return Err(QmpError::Protocol {
                        path: self.path.clone(),
                        line: m.to_string(),
                    });
                }
                Err(QmpError::Timeout { .. }) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads one message; events are queued and also returned.
    async fn read_message(&mut self, what: &str, timeout: Duration) -> Result<Value, QmpError> {
        // Up to a newline, never more than the limit held (a line without end must not grow
        // memory until the timeout); the rest of a line over it is skipped.
        let read = async {
            loop {
                let buf = self.reader.fill_buf().await?;
                if buf.is_empty() {
                    return Ok::<usize, std::io::Error>(0);
                }
                let (len, ends) = match buf.iter().position(|&b| b == b'\n') {
                    Some(i) => (i + 1, true),
                    None => (buf.len(), false),
                };
                if self.skipping {
                    self.reader.consume(len);
                    self.skipping = !ends;
                    continue;
                }
                let room = (MAX_LINE + 1).saturating_sub(self.partial.len());
                let take = len.min(room);
                self.partial.extend_from_slice(&buf[..take]);
                self.reader.consume(take);
                if (ends && take == len) || self.partial.len() > MAX_LINE {
                    return Ok(take);
                }
            }
        };
        let n = tokio::time::timeout(timeout, read)
            .await
            .map_err(|_| QmpError::Timeout {
                path: self.path.clone(),
                what: what.into(),
                timeout,
            })?
            .map_err(|e| self.io(format!("read failed: {e}")))?;
        if self.partial.len() > MAX_LINE {
            self.skipping = !self.partial.ends_with(b"\n");
            self.partial.clear();
            return Err(self.io(format!("a message longer than {MAX_LINE} bytes")));
        }
        if n == 0 && !self.partial.ends_with(b"\n") {
            return Err(self.io("QEMU closed the monitor".into()));
        }
        let line = String::from_utf8_lossy(&std::mem::take(&mut self.partial)).into_owned();
        let v: Value = serde_json::from_str(line.trim()).map_err(|_| QmpError::Protocol {
            path: self.path.clone(),
            line: line.trim().chars().take(200).collect(),
        })?;
        if let Some(name) = v.get("event").and_then(Value::as_str) {
            let event = parse_event(name, &v);
            if let Some(hook) = self.hook.as_mut() {
                hook(&event);
            }
            self.events.push_back(event);
            // Bounded: a monitor nobody drains for events keeps only the latest.
            while self.events.len() > 1024 {
                self.events.pop_front();
            }
        }
        Ok(v)
    }

    fn io(&self, what: String) -> QmpError {
        QmpError::Io {
            path: self.path.clone(),
            what,
        }
    }
}

fn parse_event(name: &str, v: &Value) -> QmpEvent {
    let ts = v.get("timestamp");
    let secs = ts
        .and_then(|t| t.get("seconds"))
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let micros = ts
        .and_then(|t| t.get("microseconds"))
        .and_then(Value::as_u64)
        .unwrap_or(0);
    QmpEvent {
        name: name.to_string(),
        // (A time past what the system can hold reads as the epoch, not a panic.)
        at: UNIX_EPOCH
            .checked_add(Duration::from_secs(secs))
            .and_then(|t| t.checked_add(Duration::from_micros(micros)))
            .unwrap_or(UNIX_EPOCH),
        data: v.get("data").cloned().unwrap_or(Value::Null),
    }
}

/// A migration capability setting, as `migrate-set-capabilities` wants it.
pub fn capability(name: &str, on: bool) -> Value {
    json!({"capability": name, "state": on})
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::UnixListener;

    /// A fake QEMU monitor: greets, answers each command from `script`, with events between.
    async fn fake(listener: UnixListener, script: Vec<&'static str>) {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        for answer in script {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "client closed early");
            s.write_all(answer.as_bytes()).await.unwrap();
        }
        // Keep the socket open until the client is done.
        let _ = s.read(&mut buf).await;
    }

    /// Accepts one client, greets it and answers its `qmp_capabilities`.
    async fn negotiated(listener: &UnixListener) -> UnixStream {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        assert!(s.read(&mut buf).await.unwrap() > 0);
        s.write_all(b"{\"return\": {}}\n").await.unwrap();
        s
    }

    #[tokio::test]
    async fn commands_events_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(fake(
            listener,
            vec![
                "{\"return\": {}}\n",
                "{\"event\": \"STOP\", \"timestamp\": {\"seconds\": 1700000000, \"microseconds\": 250000}}\n{\"return\": {\"status\": \"paused\", \"running\": false}}\n",
                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"no such thing\"}}\n",
            ],
        ));
        let mut q = Qmp::connect(&path, Duration::from_secs(5)).await.unwrap();
        assert_eq!(q.status().await.unwrap(), "paused");
        let stop = q
            .wait_event("STOP", Duration::from_millis(10))
            .await
            .unwrap();
        assert_eq!(
            stop.at,
            UNIX_EPOCH + Duration::from_secs(1_700_000_000) + Duration::from_millis(250)
        );
        let err = q.execute("frobnicate", None).await.unwrap_err();
        assert!(
            matches!(err, QmpError::Command { ref desc, .. } if desc == "no such thing"),
            "{err}"
        );
        let none = q.wait_event("RESUME", Duration::from_millis(50)).await;
        assert!(matches!(none, Err(QmpError::Timeout { .. })), "{none:?}");
        drop(q);
        server.await.unwrap();
    }

    /// Reads one JSON line from a client.
    async fn line(s: &mut BufReader<UnixStream>) -> Value {
        let mut l = String::new();
        s.read_line(&mut l).await.unwrap();
        serde_json::from_str(&l).unwrap()
    }

    /// A monitor that offers out-of-band execution: it is turned on, `migrate-recover` goes
    /// out of band, and the late answer to a command whose wait timed out is passed over
    /// (its id is not the next command's).
    #[tokio::test]
    async fn out_of_band_and_a_late_answer_passed_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let (late, mut late_rx) = tokio::sync::mpsc::channel::<()>(1);
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let mut s = BufReader::new(s);
            s.get_mut()
                .write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": [\"oob\"]}}\n")
                .await
                .unwrap();
            let caps = line(&mut s).await;
            assert_eq!(caps["execute"], "qmp_capabilities");
            assert_eq!(caps["arguments"]["enable"], json!(["oob"]));
            let id = caps["id"].clone();
            let answer = json!({"return": {}, "id": id}).to_string() + "\n";
            s.get_mut().write_all(answer.as_bytes()).await.unwrap();
            // query-status: answered only after the client gave up on it.
            let slow = line(&mut s).await;
            assert_eq!(slow["execute"], "query-status");
            late_rx.recv().await.unwrap();
            let stale = json!({"return": {"status": "stale"}, "id": slow["id"]}).to_string();
            s.get_mut()
                .write_all((stale + "\n").as_bytes())
                .await
                .unwrap();
            let recover = line(&mut s).await;
            assert_eq!(recover["exec-oob"], "migrate-recover", "{recover}");
            assert_ne!(recover["id"], slow["id"]);
            let ok = json!({"return": {}, "id": recover["id"]}).to_string() + "\n";
            s.get_mut().write_all(ok.as_bytes()).await.unwrap();
            let status = line(&mut s).await;
            let ok = json!({"return": {"status": "running"}, "id": status["id"]}).to_string();
            s.get_mut().write_all((ok + "\n").as_bytes()).await.unwrap();
            // Until the client is done.
            let _ = s.read_line(&mut String::new()).await;
        });
        // Long enough for a loaded host; the slow answer is held until the client gave up.
        let mut q = Qmp::connect_oob(&path, Duration::from_secs(2))
            .await
            .unwrap();
        assert!(q.oob());
        let e = q.status().await.unwrap_err();
        assert!(matches!(e, QmpError::Timeout { .. }), "{e}");
        late.send(()).await.unwrap();
        // The stale answer comes first: not taken for this one's.
        q.execute_oob("migrate-recover", Some(json!({"uri": "unix:/x"})))
            .await
            .unwrap();
        assert_eq!(q.status().await.unwrap(), "running");
        drop(q);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn events_polled_without_a_command() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let (go, mut resume) = tokio::sync::mpsc::channel::<()>(1);
        let server = tokio::spawn(async move {
            let mut s = negotiated(&listener).await;
            let mut buf = vec![0u8; 4096];
            let ev = |name: &str| {
                format!(
                    "{{\"event\": \"{name}\", \"timestamp\": {{\"seconds\": 1, \"microseconds\": 0}}}}\n"
                )
            };
            // A line in two writes: a poll in between must not lose its first half.
            let stop = ev("STOP");
            s.write_all(&stop.as_bytes()[..10]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            s.write_all(&stop.as_bytes()[10..]).await.unwrap();
            resume.recv().await.unwrap();
            s.write_all(ev("RESUME").as_bytes()).await.unwrap();
            let _ = s.read(&mut buf).await;
        });
        let mut q = Qmp::connect(&path, Duration::from_secs(5)).await.unwrap();
        let paused = |q: &Qmp| q.latest_is("STOP", &["STOP", "RESUME"]);
        assert!(!paused(&q), "no event yet");
        let t0 = std::time::Instant::now();
        while !paused(&q) {
            assert!(t0.elapsed() < Duration::from_secs(5), "STOP never seen");
            q.poll_events(Duration::ZERO).await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        go.send(()).await.unwrap();
        while paused(&q) {
            assert!(t0.elapsed() < Duration::from_secs(5), "RESUME never seen");
            q.poll_events(Duration::ZERO).await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Both still queued for whoever waits for them.
        assert!(q.take_event("STOP").is_some() && q.take_event("RESUME").is_some());
        drop(q);
        server.await.unwrap();
    }

    /// QEMU sends `STOP` while it holds the answer to a command (it completes a migration
    /// and its final round waits on the caller): the hook sees the event before the answer.
    #[tokio::test]
    async fn the_hook_sees_an_event_while_a_command_waits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let server = tokio::spawn(async move {
            let mut s = negotiated(&listener).await;
            let mut buf = vec![0u8; 4096];
            // query-migrate: the event now, the answer only once the client acted on it.
            assert!(s.read(&mut buf).await.unwrap() > 0);
            s.write_all(
                b"{\"event\": \"STOP\", \"timestamp\": {\"seconds\": 5, \"microseconds\": 0}}\n",
            )
            .await
            .unwrap();
            let seen = tokio::time::timeout(Duration::from_secs(5), seen_rx.recv()).await;
            assert_eq!(
                seen.ok().flatten().as_deref(),
                Some("STOP"),
                "the hook did not fire while the command waited"
            );
            s.write_all(b"{\"return\": {\"status\": \"device\"}}\n")
                .await
                .unwrap();
            let _ = s.read(&mut buf).await;
        });
        let mut q = Qmp::connect(&path, Duration::from_secs(10)).await.unwrap();
        q.on_event(Some(Box::new(move |e: &QmpEvent| {
            let _ = seen_tx.send(e.name.clone());
        })));
        let r = q.execute("query-migrate", None).await.unwrap();
        assert_eq!(r["status"], "device");
        // Still queued for a waiter, too.
        assert!(q.take_event("STOP").is_some());
        q.on_event(None);
        drop(q);
        server.await.unwrap();
    }

    /// A message over the limit is an error, read no further than the limit, and the monitor
    /// answers the next command; a time past what the system holds is no panic; the STOP
    /// that counts is the one no RESUME followed.
    #[tokio::test]
    async fn an_overlong_message_is_skipped_and_the_monitor_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let mut s = negotiated(&listener).await;
            let mut buf = vec![0u8; 4096];
            assert!(s.read(&mut buf).await.unwrap() > 0);
            // 3 MiB in one line, in pieces, then the answer.
            let piece = vec![b'x'; 64 << 10];
            for _ in 0..48 {
                s.write_all(&piece).await.unwrap();
            }
            s.write_all(b"\n").await.unwrap();
            s.write_all(
                b"{\"event\": \"STOP\", \"timestamp\": {\"seconds\": 18446744073709551615, \
                  \"microseconds\": 18446744073709551615}}\n",
            )
            .await
            .unwrap();
            for (name, secs) in [("RESUME", 2), ("STOP", 3), ("RESUME", 4), ("STOP", 5)] {
                let e = format!(
                    "{{\"event\": \"{name}\", \"timestamp\": {{\"seconds\": {secs}, \"microseconds\": 0}}}}\n"
                );
                s.write_all(e.as_bytes()).await.unwrap();
            }
            s.write_all(b"{\"return\": {\"status\": \"running\"}}\n")
                .await
                .unwrap();
            let _ = s.read(&mut buf).await;
        });
        let mut q = Qmp::connect(&path, Duration::from_secs(5)).await.unwrap();
        let err = q.execute("query-status", None).await.unwrap_err();
        assert!(err.to_string().contains("longer than"), "{err}");
        assert!(q.partial.len() <= MAX_LINE, "{}", q.partial.len());
        // The answer that follows the long line is still read.
        let r = q.execute("query-status", None).await.unwrap();
        assert_eq!(r["status"], "running");
        let stop = q.take_latest("STOP", &["STOP", "RESUME"]).unwrap();
        assert_eq!(stop.at, UNIX_EPOCH + Duration::from_secs(5));
        assert!(
            q.take_event("STOP").is_none(),
            "earlier STOPs taken with it"
        );
        drop(q);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn garbage_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(b"this is not json\n").await.unwrap();
            tokio::time::sleep(Duration::from_secs(1)).await;
        });
        let err = Qmp::connect(&path, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, QmpError::Protocol { .. }), "{err}");
        let missing = Qmp::connect(&dir.path().join("nope"), Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(missing, QmpError::Connect { .. }), "{missing}");
    }
}
