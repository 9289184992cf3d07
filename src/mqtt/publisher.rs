//! The publisher task: one task owns the broker connection, replays the outbox in order, deletes a result only on
//! the broker's acknowledgement, and hands received commands to the daemon.
//!
//! Design notes (rumqttc 0.25):
//! - Every connection is a fresh `AsyncClient`/`EventLoop` pair with a clean session. rumqttc's own
//!   retransmission queue is never relied upon: after a reconnect the outbox is replayed from its oldest entry, so a
//!   duplicate carries the same `message_id` and nothing depends on state that a lost connection could corrupt. A
//!   request that was still queued in a dead client cannot leak into the next connection either.
//! - `EventLoop::poll` is not cancellation-safe (a request taken from the channel can be lost while being written),
//!   so the poll future is never dropped inside `select!`: it owns the event loop and hands it back when it
//!   completes.
//! - rumqttc assigns packet ids when it takes a request from its channel and reports them, in request order, as
//!   `Outgoing::Publish(pkid)` (or `Outgoing::AwaitAck(pkid)` on a packet-id collision, followed later by
//!   `Outgoing::Publish(pkid)`). This task is the only sender on the connection's client, so a FIFO of what it
//!   sent maps each reported pkid to its outbox row; `PubAck`/`PubComp` then acknowledges that row.

use crate::util::{error_chain, now_rfc3339};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS, SubscribeReasonCode,
};
use serde::Serialize;
use serde_json::json;
use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use super::topics::{CommandKind, CommandTopic, ModelTopic, Topics};
use super::{MqttConfig, MqttError};
use crate::outbox::{Outbox, OutboxError};

/// Largest command accepted from the broker; a bigger packet ends the connection (rumqttc's rule).
const MAX_INCOMING_PACKET: usize = 1024 * 1024;
/// MQTT's own limit for a packet's remaining length.
const MAX_OUTGOING_PACKET: usize = 268_435_455;
/// Packet ids beyond our own outbox window, for `online`, retained state, command replies and the subscription,
/// so rumqttc's packet-id ring practically never collides with an unacknowledged publish.
const PKID_HEADROOM: u16 = 256;
/// How long a graceful shutdown waits for the DISCONNECT packet to be written.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause before retrying to read the outbox after it failed.
const OUTBOX_RETRY: Duration = Duration::from_secs(1);
/// The read-ahead holds up to this many in-flight windows of outbox messages.
const READ_AHEAD_WINDOWS: usize = 2;
/// Pending status/response publishes accepted from handles.
const REQUEST_QUEUE: usize = 256;

/// A command received on `<prefix>/<node>/cmd/<kind>`.
#[derive(Debug, Clone, PartialEq)]
pub struct IncomingCommand {
    /// The command kind from the topic.
    pub kind: CommandKind,
    /// The JSON payload (`null` for an empty payload).
    pub payload: serde_json::Value,
    /// Where the reply goes (`<prefix>/<node>/cmd/<kind>/response`); send it with [`PublisherHandle::respond`].
    pub response_topic: String,
}

/// Connection state for status and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Connection {
    /// Trying to connect (at start or after a lost connection).
    Connecting,
    /// Connected; results are flowing.
    Connected,
    /// Connection lost or refused; waiting before the next attempt.
    Disconnected,
    /// Shut down.
    Stopped,
}

/// What the publisher reports through [`Publisher::state`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PublisherState {
    /// Current connection state.
    pub connection: Connection,
    /// When `connection` last changed.
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
    /// The last connection error, if any.
    pub last_error: Option<String>,
    /// Outbox messages handed to the broker (re-sends after a reconnect included).
    pub published: u64,
    /// Outbox messages acknowledged by the broker (and deleted from the outbox).
    pub acked: u64,
    /// Successful connections after the first one.
    pub reconnects: u64,
    /// Failed connection attempts and lost connections.
    pub connection_errors: u64,
    /// Outbox messages published and not yet acknowledged.
    pub in_flight: u64,
    /// Commands handed to the daemon.
    pub commands: u64,
    /// Commands refused (retained, malformed, queue full).
    pub commands_rejected: u64,
}

impl PublisherState {
    fn new() -> Self {
        Self {
            connection: Connection::Connecting,
            since: OffsetDateTime::now_utc(),
            last_error: None,
            published: 0,
            acked: 0,
            reconnects: 0,
            connection_errors: 0,
            in_flight: 0,
            commands: 0,
            commands_rejected: 0,
        }
    }
}

enum Request {
    Retained { topic: String, payload: Vec<u8> },
    Respond { topic: String, payload: Vec<u8> },
    Subscribe(String),
    Unsubscribe(String),
}

/// A message received on a model topic (`<prefix>/models/…`, see [`super::transfer`]) through a filter added with
/// [`PublisherHandle::subscribe`].
#[derive(Debug, Clone, PartialEq)]
pub struct ModelMessage {
    /// What the topic is.
    pub topic: ModelTopic,
    /// The raw payload (empty when a retained message was cleared).
    pub payload: Vec<u8>,
    /// Whether the broker delivered it as a retained message.
    pub retain: bool,
}

/// Bytes of model messages waiting for the daemon (payloads, plus [`MODEL_MESSAGE_OVERHEAD`] each). Bounded in
/// bytes, not messages: a subscription to `<prefix>/models/+` brings every retained announcement of the fleet at
/// once, hundreds of small messages the receiver must all see, while a few large chunks are what can cost memory.
/// A message that does not fit is dropped and logged; the receiver asks for chunks again by re-subscribing.
const MODEL_QUEUE_BYTES: usize = 32 * 1024 * 1024;
/// What a queued model message counts beyond its payload (its topic and bookkeeping), so that empty ones count too.
const MODEL_MESSAGE_OVERHEAD: usize = 256;

/// Messages on model topics, in the order they arrived ([`Publisher::take_model_messages`]).
#[derive(Debug)]
pub struct ModelMessages {
    rx: mpsc::UnboundedReceiver<ModelMessage>,
    queued: Arc<AtomicUsize>,
}

impl ModelMessages {
    /// The next message; `None` once the publisher has stopped.
    pub async fn recv(&mut self) -> Option<ModelMessage> {
        let msg = self.rx.recv().await?;
        self.queued.fetch_sub(msg.payload.len() + MODEL_MESSAGE_OVERHEAD, Ordering::Relaxed);
        Some(msg)
    }
}

/// The publisher's side of [`ModelMessages`].
struct ModelQueue {
    tx: mpsc::UnboundedSender<ModelMessage>,
    queued: Arc<AtomicUsize>,
}

impl ModelQueue {
    fn new() -> (Self, ModelMessages) {
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        (Self { tx, queued: queued.clone() }, ModelMessages { rx, queued })
    }

    /// Queues `msg` unless that would take the queue beyond [`MODEL_QUEUE_BYTES`]; the reason when it does not.
    fn push(&self, msg: ModelMessage) -> Result<(), &'static str> {
        let cost = msg.payload.len() + MODEL_MESSAGE_OVERHEAD;
        // Only this side adds, so the check cannot be overtaken; the receiver only takes away.
        if self.queued.load(Ordering::Relaxed) + cost > MODEL_QUEUE_BYTES {
            return Err("the model receiver's queue is full");
        }
        self.queued.fetch_add(cost, Ordering::Relaxed);
        self.tx.send(msg).map_err(|_| {
            self.queued.fetch_sub(cost, Ordering::Relaxed);
            "the model receiver has stopped"
        })
    }
}

/// Cheap handle for publishing status and command replies; these bypass the outbox.
#[derive(Clone)]
pub struct PublisherHandle {
    tx: mpsc::Sender<Request>,
    topics: Topics,
}

impl std::fmt::Debug for PublisherHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublisherHandle").field("topics", &self.topics).finish_non_exhaustive()
    }
}

impl PublisherHandle {
    /// Publishes `payload` retained (QoS 1), now if connected, and again after every reconnect, so the broker
    /// holds the latest value even if it lost its retained store. A later call for the same topic replaces it.
    pub fn publish_retained(&self, topic: String, payload: &serde_json::Value) -> Result<(), MqttError> {
        check_topic(&topic)?;
        self.send(Request::Retained { topic, payload: payload.to_string().into_bytes() })
    }

    /// Publishes a command reply (QoS 1, not retained). Replies are not queued while disconnected: they are dropped
    /// with a warning, since the commander's request is gone with the connection too.
    pub fn respond(&self, topic: String, payload: &serde_json::Value) -> Result<(), MqttError> {
        check_topic(&topic)?;
        self.send(Request::Respond { topic, payload: payload.to_string().into_bytes() })
    }

    /// Subscribes to `filter` (QoS 1) now if connected and again after every reconnect, which also makes the broker
    /// deliver its retained messages again. Messages on model topics arrive on [`Publisher::take_model_messages`];
    /// other topics outside `cmd/` are not routed anywhere.
    pub fn subscribe(&self, filter: String) -> Result<(), MqttError> {
        self.send(Request::Subscribe(filter))
    }

    /// Ends a subscription made with [`PublisherHandle::subscribe`].
    pub fn unsubscribe(&self, filter: String) -> Result<(), MqttError> {
        self.send(Request::Unsubscribe(filter))
    }

    /// The topics of this node.
    pub fn topics(&self) -> &Topics {
        &self.topics
    }

    fn send(&self, r: Request) -> Result<(), MqttError> {
        self.tx.try_send(r).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => MqttError::Busy,
            mpsc::error::TrySendError::Closed(_) => MqttError::Stopped,
        })
    }
}

fn valid_topic(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#', '\0'])
}

fn check_topic(topic: &str) -> Result<(), MqttError> {
    if valid_topic(topic) { Ok(()) } else { Err(MqttError::InvalidTopic(topic.to_owned())) }
}

/// The running publisher. Dropping it (or [`Publisher::abort`]) ends the connection abruptly, so the broker
/// publishes the last will `offline`; [`Publisher::shutdown`] is the graceful way (`stopped`).
pub struct Publisher {
    handle: PublisherHandle,
    state: watch::Receiver<PublisherState>,
    shutdown: watch::Sender<bool>,
    announce_stop: Arc<AtomicBool>,
    task: Option<JoinHandle<()>>,
    models: Option<ModelMessages>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher").field("state", &*self.state.borrow()).finish_non_exhaustive()
    }
}

impl Publisher {
    /// Validates `cfg`, reads the password and TLS files, and spawns the publisher task on the current Tokio
    /// runtime (it must be called inside one). Returns the receiver of commands addressed to this node.
    pub fn start(cfg: &MqttConfig, outbox: Outbox) -> Result<(Self, mpsc::Receiver<IncomingCommand>), MqttError> {
        let topics = cfg.topics()?;
        let mut opts = cfg.client_options(&cfg.client_id())?;
        // Automatic acks for incoming commands: with a clean session the broker would never redeliver a command we
        // left unacknowledged, so manual acks would add bookkeeping without adding delivery. A command that cannot
        // be queued gets an explicit `busy` reply instead.
        opts.set_clean_session(true)
            .set_manual_acks(false)
            .set_inflight(cfg.max_in_flight.saturating_add(PKID_HEADROOM))
            .set_max_packet_size(MAX_INCOMING_PACKET, MAX_OUTGOING_PACKET)
            .set_last_will(LastWill::new(topics.available(), "offline", QoS::AtLeastOnce, true));

        let (req_tx, req_rx) = mpsc::channel(REQUEST_QUEUE);
        let (cmd_tx, cmd_rx) = mpsc::channel(cfg.command_queue);
        let (model_tx, model_rx) = ModelQueue::new();
        let (state_tx, state) = watch::channel(PublisherState::new());
        let (shutdown, shutdown_rx) = watch::channel(false);
        let announce_stop = Arc::new(AtomicBool::new(true));
        let handle = PublisherHandle { tx: req_tx, topics: topics.clone() };
        let max_in_flight = usize::from(cfg.max_in_flight);
        let ctx = Ctx {
            opts,
            // Our window, the headroom publishes and the subscription all fit, so `try_publish` never finds the
            // channel full in normal operation.
            channel_cap: max_in_flight * 2 + usize::from(PKID_HEADROOM) + REQUEST_QUEUE,
            topics,
            max_in_flight,
            reconnect_min: cfg.reconnect_min,
            reconnect_max: cfg.reconnect_max,
            shutdown_timeout: cfg.shutdown_timeout,
            tail: outbox.changes(),
            outbox,
            requests: req_rx,
            commands: cmd_tx,
            models: model_tx,
            subscriptions: BTreeSet::new(),
            state: state_tx,
            shutdown: shutdown_rx,
            announce_stop: announce_stop.clone(),
            retained: BTreeMap::new(),
            acks: JoinSet::new(),
            connected_before: false,
            tail_open: true,
        };
        tracing::info!(host = %cfg.host, port = cfg.port, client_id = %cfg.client_id(), node = ctx.topics.node(),
            tls = cfg.tls.is_some(), "MQTT publisher starting");
        let task = tokio::spawn(ctx.run());
        Ok((Self { handle, state, shutdown, announce_stop, task: Some(task), models: Some(model_rx) }, cmd_rx))
    }

    /// The receiver of messages on model topics (see [`PublisherHandle::subscribe`]); `None` after the first call.
    pub fn take_model_messages(&mut self) -> Option<ModelMessages> {
        self.models.take()
    }

    /// A handle for status, model state and command replies.
    pub fn handle(&self) -> PublisherHandle {
        self.handle.clone()
    }

    /// Connection state and counters; updated on every change.
    pub fn state(&self) -> watch::Receiver<PublisherState> {
        self.state.clone()
    }

    /// The topics of this node.
    pub fn topics(&self) -> &Topics {
        &self.handle.topics
    }

    /// Graceful stop: publishes `stopped` (retained) to `available`, waits up to `shutdown_timeout` for it and for
    /// in-flight results to be acknowledged, then disconnects cleanly so the broker discards the last will. When
    /// not connected it just stops; the broker already shows `offline` then. Unacknowledged results stay in the
    /// outbox for the next start.
    pub async fn shutdown(mut self) {
        // The receiver lives as long as the task; if it is gone the task has ended already.
        let _ = self.shutdown.send(true);
        if let Some(task) = self.task.take()
            && let Err(e) = task.await
        {
            tracing::error!(error = %e, "MQTT publisher task failed");
        }
    }

    /// Like [`Publisher::shutdown`] but without publishing `stopped`, for an in-process restart (a configuration
    /// reload): the clean DISCONNECT keeps the broker from publishing `offline`, and the next connection says
    /// `online` again.
    pub async fn shutdown_for_restart(self) {
        self.announce_stop.store(false, Ordering::SeqCst);
        self.shutdown().await;
    }

    /// Abrupt stop: the connection is dropped without DISCONNECT, as in a crash, so the broker publishes `offline`.
    pub fn abort(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// State that outlives single connections.
struct Ctx {
    opts: MqttOptions,
    channel_cap: usize,
    topics: Topics,
    max_in_flight: usize,
    reconnect_min: Duration,
    reconnect_max: Duration,
    shutdown_timeout: Duration,
    outbox: Outbox,
    tail: watch::Receiver<u64>,
    requests: mpsc::Receiver<Request>,
    commands: mpsc::Sender<IncomingCommand>,
    models: ModelQueue,
    /// Filters added through handles, subscribed again on every connect (the session is clean).
    subscriptions: BTreeSet<String>,
    state: watch::Sender<PublisherState>,
    shutdown: watch::Receiver<bool>,
    /// False when the shutdown is a restart: no `stopped`.
    announce_stop: Arc<AtomicBool>,
    /// Latest retained payload per topic, re-published on every connect.
    retained: BTreeMap<String, Vec<u8>>,
    /// Outbox deletions after PUBACK; they run beside the connection so a slow fsync never stalls the event loop.
    acks: JoinSet<Result<(), OutboxError>>,
    connected_before: bool,
    /// False once the outbox's change notifications ended (its worker is gone).
    tail_open: bool,
}

enum End {
    Shutdown,
    Lost { was_connected: bool, error: String },
}

impl Ctx {
    async fn run(mut self) {
        let mut backoff = self.reconnect_min;
        loop {
            if *self.shutdown.borrow() {
                break;
            }
            self.set_connection(Connection::Connecting);
            let end = {
                let (mut session, el) = Session::new(&mut self);
                session.run(el).await
            };
            match end {
                End::Shutdown => break,
                End::Lost { was_connected, error } => {
                    if was_connected {
                        backoff = self.reconnect_min;
                        tracing::warn!(error, "MQTT connection lost; results stay in the outbox");
                    } else {
                        tracing::warn!(error, retry_in = ?backoff, "MQTT connection failed");
                    }
                    self.state.send_modify(|s| {
                        s.connection = Connection::Disconnected;
                        s.since = OffsetDateTime::now_utc();
                        s.last_error = Some(error);
                        s.connection_errors += 1;
                        s.in_flight = 0;
                    });
                    if self.wait(backoff).await {
                        break;
                    }
                    backoff = (backoff * 2).min(self.reconnect_max);
                }
            }
        }
        self.finish_acks().await;
        self.set_connection(Connection::Stopped);
        tracing::info!("MQTT publisher stopped");
    }

    /// Sleeps before the next connection attempt while still taking requests; true when shutdown was requested.
    async fn wait(&mut self, delay: Duration) -> bool {
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => return false,
                _ = self.shutdown.changed() => return true,
                Some(req) = self.requests.recv() => match req {
                    Request::Retained { topic, payload } => {
                        self.retained.insert(topic, payload);
                    }
                    Request::Respond { topic, .. } => {
                        tracing::warn!(topic, "command reply dropped: not connected to the broker");
                    }
                    Request::Subscribe(f) => {
                        self.subscriptions.insert(f);
                    }
                    Request::Unsubscribe(f) => {
                        self.subscriptions.remove(&f);
                    }
                },
                Some(r) = self.acks.join_next(), if !self.acks.is_empty() => log_ack(r),
            }
        }
    }

    async fn finish_acks(&mut self) {
        while let Some(r) = self.acks.join_next().await {
            log_ack(r);
        }
    }

    fn set_connection(&self, c: Connection) {
        self.state.send_if_modified(|s| {
            if s.connection == c {
                return false;
            }
            s.connection = c;
            s.since = OffsetDateTime::now_utc();
            true
        });
    }
}

fn log_ack(r: Result<Result<(), OutboxError>, tokio::task::JoinError>) {
    match r {
        Ok(Ok(())) => {}
        // The row stays and is published again after the next reconnect: a duplicate, never a loss.
        Ok(Err(e)) => tracing::error!(error = %e, "deleting an acknowledged result from the outbox failed"),
        Err(e) => tracing::error!(error = %e, "outbox acknowledgement task failed"),
    }
}

/// What a publish was, to act on its acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tag {
    Outbox(i64),
    Stopped,
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    /// `stopped` is published; waiting for its PUBACK and the in-flight results.
    Draining(Instant),
    /// DISCONNECT requested; waiting for it to be written.
    Disconnecting(Instant),
}

type PollFuture = Pin<Box<dyn Future<Output = (EventLoop, Result<Event, ConnectionError>)> + Send>>;

/// A background outbox read: the limit it asked for, and the answer.
type ReadFuture = Pin<Box<dyn Future<Output = (usize, Result<crate::outbox::Batch, OutboxError>)> + Send>>;

/// Completes when the background read does; never while there is none.
async fn read_done(reading: &mut Option<ReadFuture>) -> (usize, Result<crate::outbox::Batch, OutboxError>) {
    match reading {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

fn poll_once(mut el: EventLoop) -> PollFuture {
    Box::pin(async move {
        let r = el.poll().await;
        (el, r)
    })
}

/// One connection, from CONNECT to its loss or a graceful disconnect.
struct Session<'a> {
    ctx: &'a mut Ctx,
    client: AsyncClient,
    connected: bool,
    phase: Phase,
    /// Publishes handed to the client whose pkid is not known yet, in order.
    sent: VecDeque<Tag>,
    /// Publishes on the wire, by pkid, until PUBACK (QoS 1) or PUBCOMP (QoS 2).
    on_wire: HashMap<u16, Tag>,
    /// A publish rumqttc holds back because its pkid is still in use.
    collided: Option<(u16, Tag)>,
    /// Outbox messages handed over in this session and not acknowledged.
    outstanding: usize,
    /// Highest outbox id read in this session; the next read starts after it.
    cursor: Option<i64>,
    /// Outbox messages read ahead and not yet handed to the client, oldest first. Reading ahead (in the background)
    /// means a PUBACK frees a slot that is refilled at once, without waiting for a database round trip.
    ahead: VecDeque<crate::outbox::Entry>,
    /// Whether the outbox may hold messages after `cursor`.
    more: bool,
    /// The outbox changed while a read was running; the read's answer may predate the change.
    changed_while_reading: bool,
    want_fill: bool,
    retry_fill: Option<Instant>,
    stopped_acked: bool,
}

impl<'a> Session<'a> {
    fn new(ctx: &'a mut Ctx) -> (Self, EventLoop) {
        let (client, el) = AsyncClient::new(ctx.opts.clone(), ctx.channel_cap);
        let s = Self {
            ctx,
            client,
            connected: false,
            phase: Phase::Running,
            sent: VecDeque::new(),
            on_wire: HashMap::new(),
            collided: None,
            outstanding: 0,
            cursor: None,
            ahead: VecDeque::new(),
            more: true,
            changed_while_reading: false,
            want_fill: false,
            retry_fill: None,
            stopped_acked: false,
        };
        (s, el)
    }
}

impl Session<'_> {
    async fn run(&mut self, el: EventLoop) -> End {
        // Deletions acknowledged on the previous connection must land before the replay reads the outbox, or
        // they would be sent again.
        self.ctx.finish_acks().await;
        let mut poll = poll_once(el);
        let mut reading: Option<ReadFuture> = None;
        loop {
            let deadline = match self.phase {
                Phase::Running => None,
                Phase::Draining(d) | Phase::Disconnecting(d) => Some(d),
            };
            let running = self.phase == Phase::Running;
            tokio::select! {
                (el, r) = &mut poll => {
                    match r {
                        Ok(ev) => {
                            if let Some(end) = self.on_event(ev) {
                                return end;
                            }
                        }
                        Err(e) if matches!(self.phase, Phase::Disconnecting(_)) => {
                            tracing::debug!(error = %e, "connection closed while disconnecting");
                            return End::Shutdown;
                        }
                        Err(e) => return End::Lost { was_connected: self.connected, error: error_chain(&e) },
                    }
                    poll = poll_once(el);
                }
                changed = self.ctx.tail.changed(), if self.connected && running && self.ctx.tail_open => {
                    if changed.is_ok() {
                        self.more = true;
                        self.changed_while_reading = reading.is_some();
                        self.want_fill = true;
                    } else {
                        // Only if the outbox worker died; reads then fail and are retried on a timer.
                        tracing::error!("outbox change notifications ended");
                        self.ctx.tail_open = false;
                        self.retry_fill = Some(Instant::now() + OUTBOX_RETRY);
                    }
                }
                Some(req) = self.ctx.requests.recv() => self.on_request(req),
                _ = self.ctx.shutdown.changed(), if running => {
                    if !self.connected {
                        return End::Shutdown;
                    }
                    self.begin_shutdown();
                }
                Some(r) = self.ctx.acks.join_next(), if !self.ctx.acks.is_empty() => log_ack(r),
                (limit, r) = read_done(&mut reading) => {
                    reading = None;
                    self.on_read(limit, r);
                }
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    match self.phase {
                        Phase::Draining(_) => {
                            tracing::warn!(in_flight = self.outstanding, stopped_acked = self.stopped_acked,
                                "shutdown timeout: disconnecting with unacknowledged messages (they stay in the outbox)");
                            self.disconnect();
                        }
                        _ => {
                            tracing::warn!("DISCONNECT not written in time; closing the connection");
                            return End::Shutdown;
                        }
                    }
                }
                _ = tokio::time::sleep_until(self.retry_fill.unwrap_or_else(Instant::now)),
                    if self.retry_fill.is_some() && running => {
                    self.retry_fill = None;
                    self.want_fill = true;
                }
            }
            if matches!(self.phase, Phase::Draining(_)) && self.stopped_acked && self.outstanding == 0 {
                self.disconnect();
            }
            if self.want_fill && self.connected && self.phase == Phase::Running {
                self.fill(&mut reading);
            }
        }
    }

    fn on_event(&mut self, ev: Event) -> Option<End> {
        match ev {
            Event::Incoming(Packet::ConnAck(_)) => self.on_connected(),
            Event::Incoming(Packet::PubAck(a)) => self.on_ack(a.pkid),
            Event::Incoming(Packet::PubComp(c)) => self.on_ack(c.pkid),
            Event::Incoming(Packet::Publish(p)) => self.on_message(p),
            Event::Incoming(Packet::SubAck(s))
                if s.return_codes.iter().any(|c| matches!(c, SubscribeReasonCode::Failure)) =>
            {
                tracing::error!(filter = %self.ctx.topics.cmd_filter(),
                    "broker refused the command subscription; commands will not be received");
            }
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                let tag = match self.collided.take() {
                    Some((held, tag)) if held == pkid => Some(tag),
                    other => {
                        self.collided = other;
                        self.sent.pop_front()
                    }
                };
                match tag {
                    Some(tag) if pkid != 0 => {
                        if let Some(old) = self.on_wire.insert(pkid, tag) {
                            // rumqttc reused a pkid still awaiting its ack; that message stays in the outbox and
                            // is replayed after the next reconnect.
                            tracing::warn!(pkid, ?old, "packet id reused before its acknowledgement");
                            if matches!(old, Tag::Outbox(_)) {
                                self.outstanding = self.outstanding.saturating_sub(1);
                            }
                        }
                    }
                    Some(_) => {}
                    None => tracing::error!(pkid, "publish reported by rumqttc that this task did not send"),
                }
            }
            Event::Outgoing(Outgoing::AwaitAck(pkid)) => {
                tracing::debug!(pkid, "packet id collision; rumqttc holds the publish until the ack");
                self.collided = self.sent.pop_front().map(|tag| (pkid, tag));
            }
            Event::Outgoing(Outgoing::Disconnect) if matches!(self.phase, Phase::Disconnecting(_)) => {
                tracing::info!("disconnected from the MQTT broker");
                return Some(End::Shutdown);
            }
            _ => {}
        }
        None
    }

    fn on_connected(&mut self) {
        self.connected = true;
        let reconnect = std::mem::replace(&mut self.ctx.connected_before, true);
        self.ctx.state.send_modify(|s| {
            s.connection = Connection::Connected;
            s.since = OffsetDateTime::now_utc();
            s.reconnects += u64::from(reconnect);
        });
        tracing::info!(reconnect, outbox = self.ctx.outbox.depth().messages, "connected to the MQTT broker");
        let available = self.ctx.topics.available();
        self.publish(available, b"online".to_vec(), true, Tag::Other);
        if let Err(e) = self.client.try_subscribe(self.ctx.topics.cmd_filter(), QoS::AtLeastOnce) {
            tracing::error!(error = %e, "cannot subscribe to commands");
        }
        for f in &self.ctx.subscriptions {
            if let Err(e) = self.client.try_subscribe(f.as_str(), QoS::AtLeastOnce) {
                tracing::error!(filter = %f, error = %e, "cannot subscribe");
            }
        }
        let retained: Vec<(String, Vec<u8>)> = self.ctx.retained.iter().map(|(t, p)| (t.clone(), p.clone())).collect();
        for (topic, payload) in retained {
            self.publish(topic, payload, true, Tag::Other);
        }
        self.want_fill = true;
    }

    fn on_ack(&mut self, pkid: u16) {
        match self.on_wire.remove(&pkid) {
            Some(Tag::Outbox(id)) => {
                self.outstanding = self.outstanding.saturating_sub(1);
                let outbox = self.ctx.outbox.clone();
                self.ctx.acks.spawn(async move { outbox.ack(id).await });
                let in_flight = self.outstanding as u64;
                self.ctx.state.send_modify(|s| {
                    s.acked += 1;
                    s.in_flight = in_flight;
                });
                self.want_fill = true;
            }
            Some(Tag::Stopped) => self.stopped_acked = true,
            Some(Tag::Other) => {}
            None => tracing::debug!(pkid, "acknowledgement for an unknown packet id"),
        }
    }

    fn on_request(&mut self, req: Request) {
        match req {
            Request::Retained { topic, payload } => {
                self.ctx.retained.insert(topic.clone(), payload.clone());
                if self.connected {
                    self.publish(topic, payload, true, Tag::Other);
                }
            }
            Request::Respond { topic, payload } => {
                if self.connected {
                    self.publish(topic, payload, false, Tag::Other);
                } else {
                    tracing::warn!(topic, "command reply dropped: not connected to the broker");
                }
            }
            Request::Subscribe(f) => {
                if self.connected
                    && let Err(e) = self.client.try_subscribe(f.as_str(), QoS::AtLeastOnce)
                {
                    tracing::error!(filter = %f, error = %e, "cannot subscribe");
                }
                self.ctx.subscriptions.insert(f);
            }
            Request::Unsubscribe(f) => {
                if self.connected
                    && let Err(e) = self.client.try_unsubscribe(f.as_str())
                {
                    tracing::warn!(filter = %f, error = %e, "cannot unsubscribe");
                }
                self.ctx.subscriptions.remove(&f);
            }
        }
    }

    /// Hands one non-outbox publish (QoS 1) to the client.
    fn publish(&mut self, topic: String, payload: Vec<u8>, retain: bool, tag: Tag) -> bool {
        match self.client.try_publish(topic.as_str(), QoS::AtLeastOnce, retain, payload) {
            Ok(()) => {
                self.sent.push_back(tag);
                true
            }
            Err(e) => {
                tracing::warn!(topic, error = %e, "publish not queued");
                false
            }
        }
    }

    fn on_message(&mut self, p: rumqttc::Publish) {
        let topics = &self.ctx.topics;
        if let Some(topic) = topics.parse_model(&p.topic) {
            let msg = ModelMessage { topic, payload: p.payload.to_vec(), retain: p.retain };
            if let Err(e) = self.ctx.models.push(msg) {
                tracing::warn!(topic = %p.topic, error = e, "model message dropped; the receiver will ask again");
            }
            return;
        }
        let parsed = topics.parse_command(&p.topic);
        if let Ok(CommandTopic::Response(_)) = parsed {
            // Our own replies come back through the `cmd/#` subscription.
            return;
        }
        if p.retain {
            // A retained command would run again on every reconnect; whoever left it there must clear it.
            tracing::warn!(topic = %p.topic, bytes = p.payload.len(),
                "retained command ignored, not executed (clear it with an empty retained message)");
            self.ctx.state.send_modify(|s| s.commands_rejected += 1);
            return;
        }
        let kind = match parsed {
            Ok(CommandTopic::Command(kind)) => kind,
            Ok(CommandTopic::Response(_)) => return,
            Err(e) => {
                tracing::warn!(topic = %p.topic, error = %e, "message on the command topic rejected");
                let reply = json!({"ok": false, "error": e.to_string(), "topic": p.topic});
                self.reject(topics.errors(), reply);
                return;
            }
        };
        let response_topic = topics.cmd_response(&kind);
        let payload = if p.payload.is_empty() {
            serde_json::Value::Null
        } else {
            match serde_json::from_slice(&p.payload) {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(kind = %kind, error = %e, "malformed command payload rejected");
                    let reply = json!({"ok": false, "kind": kind, "error": format!("malformed JSON payload: {e}")});
                    self.reject(response_topic, reply);
                    return;
                }
            }
        };
        let cmd = IncomingCommand { kind: kind.clone(), payload, response_topic: response_topic.clone() };
        match self.ctx.commands.try_send(cmd) {
            Ok(()) => {
                tracing::info!(kind = %kind, "command received");
                self.ctx.state.send_modify(|s| s.commands += 1);
            }
            Err(e) => {
                let error = match e {
                    mpsc::error::TrySendError::Full(_) => "busy: too many commands pending, retry later",
                    mpsc::error::TrySendError::Closed(_) => "commands are not accepted by this node",
                };
                tracing::warn!(kind = %kind, error, "command rejected");
                self.reject(response_topic, json!({"ok": false, "kind": kind, "error": error}));
            }
        }
    }

    fn reject(&mut self, topic: String, reply: serde_json::Value) {
        self.ctx.state.send_modify(|s| s.commands_rejected += 1);
        self.publish(topic, reply.to_string().into_bytes(), false, Tag::Other);
    }

    /// Hands read-ahead outbox messages to the client, oldest first, until the in-flight window is full, and starts
    /// the next read in the background when the read-ahead runs low and the outbox may hold more.
    fn fill(&mut self, reading: &mut Option<ReadFuture>) {
        self.want_fill = false;
        while self.outstanding < self.ctx.max_in_flight {
            let Some(entry) = self.ahead.pop_front() else { break };
            let id = entry.id;
            let mut payload = entry.payload;
            if let serde_json::Value::Object(m) = &mut payload {
                m.insert("published_at".into(), now_rfc3339().into());
            }
            // Every stored message goes out at QoS 1, whatever its row says: a row is deleted on its PUBACK, and a
            // QoS 2 row an older outbox took in would have its packet id reused before its PUBCOMP came
            // (`OutboxError::InvalidQos`). QoS 0 rows are upgraded so that they, too, leave only when acknowledged.
            let qos = QoS::AtLeastOnce;
            let bytes = payload.to_string().into_bytes();
            if let Err(e) = self.client.try_publish(entry.topic.as_str(), qos, entry.retain, bytes) {
                tracing::warn!(id, error = %e, "publish not queued; retrying shortly");
                if let serde_json::Value::Object(m) = &mut payload {
                    m.remove("published_at");
                }
                self.ahead.push_front(crate::outbox::Entry { payload, ..entry });
                self.retry_fill = Some(Instant::now() + Duration::from_millis(100));
                break;
            }
            self.sent.push_back(Tag::Outbox(id));
            self.outstanding += 1;
            self.ctx.state.send_modify(|s| s.published += 1);
        }
        self.publish_in_flight();
        if reading.is_none() && self.more && self.ahead.len() < self.ctx.max_in_flight {
            let limit = READ_AHEAD_WINDOWS * self.ctx.max_in_flight - self.ahead.len();
            let (outbox, after) = (self.ctx.outbox.clone(), self.cursor);
            self.changed_while_reading = false;
            *reading = Some(Box::pin(async move { (limit, outbox.read_batch(after, limit).await) }));
        }
    }

    /// Takes the answer of a background read into the read-ahead.
    fn on_read(&mut self, limit: usize, r: Result<crate::outbox::Batch, OutboxError>) {
        let batch = match r {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %error_chain(&e), "reading the outbox failed; retrying");
                self.retry_fill = Some(Instant::now() + OUTBOX_RETRY);
                return;
            }
        };
        // Judged by the rows read, skipped ones included: a stretch of undecodable rows is not the end of the table.
        self.more = batch.rows >= limit || std::mem::take(&mut self.changed_while_reading);
        self.cursor = batch.last_id.or(self.cursor);
        for entry in batch.entries {
            if !valid_topic(&entry.topic) {
                // The outbox refuses such topics; an old or edited database could still hold one.
                tracing::error!(id = entry.id, topic = %entry.topic, "unpublishable outbox entry skipped (left in place)");
                continue;
            }
            self.ahead.push_back(entry);
        }
        self.want_fill = true;
    }

    fn publish_in_flight(&self) {
        let n = self.outstanding as u64;
        self.ctx.state.send_if_modified(|s| std::mem::replace(&mut s.in_flight, n) != n);
    }

    fn begin_shutdown(&mut self) {
        tracing::info!(in_flight = self.outstanding, "MQTT publisher shutting down");
        let available = self.ctx.topics.available();
        self.phase = Phase::Draining(Instant::now() + self.ctx.shutdown_timeout);
        if !self.ctx.announce_stop.load(Ordering::SeqCst)
            || !self.publish(available, b"stopped".to_vec(), true, Tag::Stopped)
        {
            self.stopped_acked = true;
        }
    }

    fn disconnect(&mut self) {
        if let Err(e) = self.client.try_disconnect() {
            tracing::warn!(error = %e, "cannot queue DISCONNECT");
        }
        self.phase = Phase::Disconnecting(Instant::now() + DISCONNECT_TIMEOUT);
    }
}
