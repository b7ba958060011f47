// trio_cluster gateway client for browsers: a dependency-free ES module,
// served by the gateway at GET /gateway.js. Protocol: trio_cluster.json.v1
// (docs/gateway.md). Same behaviour as the Trio client: one socket kept up
// with jittered exponential backoff, calls with request ids, cancellation
// (AbortSignal -> "cancel" frame), streams with credit, topics with
// resume (from the last offset delivered) and presence, reliable pushes
// of the client's session (acked, each handed over once), typed errors,
// application-level ping/pong and a silent server detected within
// ping_interval + ping_timeout.

export const SUBPROTOCOL = "trio_cluster.json.v1";
export const PROTOCOL_VERSION = 1;

/** A call refused or failed on the server (code: see docs/gateway.md). */
export class GatewayCallError extends Error {
  constructor(frame) {
    super(`${frame.code}: ${frame.message}`);
    this.name = "GatewayCallError";
    this.code = frame.code;
    this.type = frame.type ?? null; // the declared error's tag, or the cluster error's type
    this.data = frame.data ?? null; // the declared error's fields
  }
  get retryable() {
    return this.code === "unavailable" || this.code === "too_many_requests";
  }
}

/** The socket closed before the reply: whether the call ran is unknown. */
export class GatewayDisconnectedError extends Error {
  constructor(code, reason) {
    super(`gateway connection closed (${code}: ${reason})`);
    this.name = "GatewayDisconnectedError";
    this.code = code;
    this.reason = reason;
  }
}

const DEFAULTS = {
  token: null, // sent as ?token=... (a browser cannot set headers)
  openTimeout: 10000, // ms to open the socket and read the welcome frame
  backoff: { initial: 100, maximum: 30000, factor: 2, jitter: 0.5 },
  maxAttempts: null, // consecutive failed attempts before giving up
  onStateChange: null, // called with the state after every change
  session: null, // the session's token (a random one by default), sent as ?session=
  onPush: null, // called with each push of the session ({ epoch, seq, data }), once; acked after
};

// Whether a topic's epoch began before another (epochs are fixed-width hex
// strings that compare in the order they began; another form never does).
const EPOCH_LENGTH = 36;
function olderEpoch(epoch, than) {
  return epoch.length === EPOCH_LENGTH && than.length === EPOCH_LENGTH && epoch < than;
}

function newSession() {
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes);
  return Array.from(bytes, (byte) => byte.toString(16).padStart(2, "0")).join("");
}

export class GatewayClient {
  constructor(url, options = {}) {
    this.options = { ...DEFAULTS, ...options, backoff: { ...DEFAULTS.backoff, ...options.backoff } };
    const target = new URL(url, globalThis.location?.href);
    if (this.options.token !== null) target.searchParams.set("token", this.options.token);
    this.session = this.options.session ?? newSession();
    target.searchParams.set("session", this.session);
    this._pushesSeen = new Set(); // "epoch:seq" of the pushes handed over (recent ones)
    this._pushOrder = [];
    this._acks = new Map(); // epoch -> seqs waiting to be acked
    this._ackTimer = null;
    this.url = target.toString();
    this.state = {
      connected: false,
      lastError: null,
      reconnectCount: 0,
      lastConnectTime: null,
      failedAttempts: 0,
      connectionId: null,
    };
    this._nextId = 0;
    this._pending = new Map();
    this._topics = new Map();
    this._ws = null;
    this._closed = false;
    this._opened = 0;
    this._waiters = [];
    this._timer = null;
    this._connect();
  }

  /** Resolves once a socket is up (rejects if the client gave up or was closed). */
  waitConnected() {
    if (this.state.connected) return Promise.resolve();
    if (this._closed) return Promise.reject(new Error(this.state.lastError ?? "closed"));
    return new Promise((resolve, reject) => this._waiters.push({ resolve, reject }));
  }

  /**
   * Call operation `op` ("Counter.increment") with a plain-data message;
   * `key` is the entity id (none for a service). Rejects with
   * GatewayCallError or GatewayDisconnectedError; `signal` aborts the call
   * (the server cancels it).
   */
  async call(op, msg, { key = null, signal = null } = {}) {
    await this.waitConnected();
    signal?.throwIfAborted();
    const id = ++this._nextId;
    const frame = { t: "call", id, op, msg };
    if (key !== null) frame.key = key;
    return new Promise((resolve, reject) => {
      const onAbort = () => {
        if (this._pending.delete(id)) this._send({ t: "cancel", id });
        reject(signal.reason);
      };
      this._pending.set(id, {
        resolve: (value) => { signal?.removeEventListener("abort", onAbort); resolve(value); },
        reject: (error) => { signal?.removeEventListener("abort", onAbort); reject(error); },
      });
      signal?.addEventListener("abort", onAbort, { once: true });
      this._send(frame);
    });
  }

  /**
   * Open a stream: `for await (const item of client.stream(op, msg, { key }))`.
   * The server sends at most `credit` items ahead of those read; leaving
   * the loop early cancels the stream's handler on the server.
   */
  stream(op, msg, { key = null, credit = 16 } = {}) {
    const client = this;
    return {
      async *[Symbol.asyncIterator]() {
        await client.waitConnected();
        const id = ++client._nextId;
        const items = [];
        let wake = null;
        let ended = false;
        let failure = null;
        const notify = () => wake?.();
        client._pending.set(id, {
          item: (value) => { items.push(value); notify(); },
          resolve: () => { ended = true; notify(); },
          reject: (error) => { failure = error; notify(); },
        });
        const frame = { t: "stream", id, op, msg, credit };
        if (key !== null) frame.key = key;
        client._send(frame);
        const batch = Math.max(1, Math.floor(credit / 2));
        let read = 0;
        try {
          while (true) {
            if (items.length > 0) {
              read += 1;
              if (read >= batch) {
                client._send({ t: "credit", id, n: read });
                read = 0;
              }
              yield items.shift();
            } else if (failure !== null) {
              throw failure;
            } else if (ended) {
              return;
            } else {
              await new Promise((resolve) => { wake = resolve; });
              wake = null;
            }
          }
        } finally {
          if (client._pending.delete(id)) client._send({ t: "cancel", id });
        }
      },
    };
  }

  /**
   * Subscribe to a topic: `onPublication({ topic, epoch, offset, data })`
   * is called for each publication, in offset order, once. After a
   * reconnect the subscription resumes from the last publication it
   * delivered; `subscription.recovered` then says whether nothing was lost.
   * Resolves once subscribed (rejects with GatewayCallError if refused);
   * `subscription.unsubscribe()` ends it. With `onPresence`,
   * `subscription.presence` is the topic's presence ({connection id: data})
   * and `onPresence(presence, { joins, leaves })` is called after each
   * change (the first call, and after each reconnect, with the whole
   * presence as `joins`).
   */
  async subscribe(topic, onPublication, { onPresence = null } = {}) {
    if (this._topics.has(topic)) throw new Error(`already subscribed to ${topic}`);
    const subscription = {
      topic,
      position: null,
      recovered: null,
      subscribed: false, // answered once (then resubscribed after each reconnect)
      presence: onPresence === null ? null : {},
      onPublication,
      onPresence,
      unsubscribe: () => {
        if (this._topics.get(topic) !== subscription) return;
        this._topics.delete(topic);
        this._send({ t: "unsubscribe", id: ++this._nextId, topic });
      },
    };
    this._topics.set(topic, subscription);
    try {
      await this._subscribe(subscription);
    } catch (error) {
      this._topics.delete(topic);
      throw error;
    }
    return subscription;
  }

  async _subscribe(subscription) {
    await this.waitConnected();
    const frame = { t: "subscribe", id: ++this._nextId, topic: subscription.topic };
    const since = subscription.position;
    if (since !== null) frame.since = since;
    if (subscription.presence !== null) frame.presence = true;
    const value = await new Promise((resolve, reject) => {
      this._pending.set(frame.id, { resolve, reject });
      this._send(frame);
    });
    subscription.subscribed = true;
    if (since !== null) subscription.recovered = value.recovered;
    if (subscription.position === null && typeof value.epoch === "string") {
      // Nothing delivered yet: resume from the answer's position, not from "now".
      subscription.position = { epoch: value.epoch, offset: value.offset };
    }
    if (subscription.presence !== null && value.presence) {
      subscription.presence = { ...value.presence };
      subscription.onPresence(subscription.presence, { joins: value.presence, leaves: {} });
    }
  }

  // Subscribe again on socket number `opened`; a refusal that may pass
  // ("unavailable": the topic is moving) is retried with the backoff while
  // that socket is up.
  async _resubscribe(subscription, opened) {
    for (let attempt = 0; ; attempt++) {
      if (this._opened !== opened || this._topics.get(subscription.topic) !== subscription) return;
      try {
        await this._subscribe(subscription);
        return;
      } catch (error) {
        if (!(error instanceof GatewayCallError) || !error.retryable) return;
      }
      const { initial, maximum, factor, jitter } = this.options.backoff;
      const delay = Math.min(maximum, initial * factor ** attempt);
      await new Promise((resolve) => setTimeout(resolve, delay * (1 - jitter * Math.random())));
    }
  }

  /** The presence of a topic ({connection id: data}), subscribed or not. */
  async presence(topic) {
    await this.waitConnected();
    const id = ++this._nextId;
    return new Promise((resolve, reject) => {
      this._pending.set(id, { resolve, reject });
      this._send({ t: "presence", id, topic });
    });
  }

  _presenceDiff(frame) {
    const subscription = this._topics.get(frame.topic);
    if (subscription === undefined || subscription.presence === null) return;
    for (const key of Object.keys(frame.leaves ?? {})) delete subscription.presence[key];
    Object.assign(subscription.presence, frame.joins ?? {});
    subscription.onPresence(subscription.presence, { joins: frame.joins ?? {}, leaves: frame.leaves ?? {} });
  }

  _publication(frame) {
    const subscription = this._topics.get(frame.topic);
    if (subscription === undefined) return;
    const last = subscription.position;
    if (last !== null && (last.epoch === frame.epoch ? frame.offset <= last.offset : olderEpoch(frame.epoch, last.epoch))) return;
    subscription.position = { epoch: frame.epoch, offset: frame.offset };
    subscription.onPublication({ topic: frame.topic, epoch: frame.epoch, offset: frame.offset, data: frame.data });
  }

  _push(frame) {
    const key = `${frame.epoch}:${frame.seq}`;
    if (!this._pushesSeen.has(key)) {
      if (this.options.onPush === null) return; // not acked: it fails at its sender
      this.options.onPush({ epoch: frame.epoch, seq: frame.seq, data: frame.data });
      this._pushesSeen.add(key);
      this._pushOrder.push(key);
      if (this._pushOrder.length > 100000) this._pushesSeen.delete(this._pushOrder.shift());
    }
    // Acked after it was handed over; a copy (a redelivery) is acked again.
    // The acks of one message (a batch of pushes) go together.
    const seqs = this._acks.get(frame.epoch) ?? [];
    seqs.push(frame.seq);
    this._acks.set(frame.epoch, seqs);
    this._ackTimer ??= setTimeout(() => this._sendAcks(), 0);
  }

  _sendAcks() {
    clearTimeout(this._ackTimer);
    this._ackTimer = null;
    for (const [epoch, waiting] of this._acks) {
      for (let start = 0; start < waiting.length; start += 1000) {
        this._send({ t: "ack", epoch, seqs: waiting.slice(start, start + 1000) });
      }
    }
    this._acks.clear();
  }

  /** Close the socket for good; pending calls are rejected. The socket
   * closes once the code running now has returned (close() may be called
   * from onPush): the acks of the pushes handed over go first. */
  close() {
    this._closed = true;
    clearTimeout(this._timer);
    const ws = this._ws;
    queueMicrotask(() => {
      this._sendAcks();
      ws?.close(1000, "client closed");
    });
    this._setState({ connected: false, lastError: "closed" });
    for (const waiter of this._waiters.splice(0)) waiter.reject(new Error("closed"));
  }

  _setState(changes) {
    this.state = { ...this.state, ...changes };
    this.options.onStateChange?.(this.state);
  }

  _send(frame) {
    if (this._ws?.readyState === WebSocket.OPEN) this._ws.send(JSON.stringify(frame));
  }

  _connect() {
    if (this._closed) return;
    let welcomed = false;
    let ws;
    try {
      ws = new WebSocket(this.url, [SUBPROTOCOL]);
    } catch (error) {
      this._failed(String(error));
      return;
    }
    this._ws = ws;
    const openTimer = setTimeout(() => {
      if (!welcomed) ws.close(4000, "no welcome frame in time");
    }, this.options.openTimeout);
    let silence = null;
    let silenceTimer = null;
    const heard = () => {
      clearTimeout(silenceTimer);
      if (silence !== null) {
        silenceTimer = setTimeout(() => ws.close(4000, "heartbeat timeout"), silence);
      }
    };
    ws.onmessage = (event) => {
      let message;
      try {
        message = JSON.parse(event.data);
      } catch {
        ws.close(1007, "not JSON");
        return;
      }
      heard();
      // A message is one frame, or a batch: a list of frames, in order.
      for (const frame of Array.isArray(message) ? message : [message]) {
        if (frame.t === "welcome") onWelcome(frame);
        else this._received(frame);
      }
    };
    const onWelcome = (frame) => {
      if (frame.v !== PROTOCOL_VERSION) {
        ws.close(4000, `protocol version ${frame.v}, expected ${PROTOCOL_VERSION}`);
        return;
      }
      welcomed = true;
      clearTimeout(openTimer);
      silence = (frame.ping_interval + frame.ping_timeout) * 1000;
      heard();
      this._opened += 1;
      this._setState({
        connected: true,
        reconnectCount: this._opened - 1,
        lastConnectTime: Date.now(),
        failedAttempts: 0,
        connectionId: frame.id,
      });
      for (const waiter of this._waiters.splice(0)) waiter.resolve();
      // Subscribe again, from the last publication delivered.
      // (Not one being made: `subscribe` does its first itself.)
      for (const subscription of this._topics.values()) {
        if (subscription.subscribed) this._resubscribe(subscription, this._opened);
      }
    };
    ws.onclose = (event) => {
      clearTimeout(openTimer);
      clearTimeout(silenceTimer);
      const reason = event.reason || (event.code === 1006 ? "connection lost" : "closed");
      for (const [id, pending] of this._pending) {
        this._pending.delete(id);
        pending.reject(new GatewayDisconnectedError(event.code, reason));
      }
      if (this._ws === ws) this._ws = null;
      if (welcomed) {
        this._setState({ connected: false, lastError: `closed (${event.code}: ${reason})` });
        this._schedule(0);
      } else {
        this._failed(`could not connect (${event.code}: ${reason})`);
      }
    };
  }

  _received(frame) {
    if (frame.t === "ping") {
      this._send({ t: "pong" });
      return;
    }
    if (frame.t === "pub") {
      this._publication(frame);
      return;
    }
    if (frame.t === "push") {
      this._push(frame);
      return;
    }
    if (frame.t === "presence" && frame.id === undefined) {
      this._presenceDiff(frame);
      return;
    }
    const pending = this._pending.get(frame.id);
    if (pending === undefined) return; // a reply to a call given up, a pong
    if (frame.t === "item") {
      pending.item?.(frame.v);
      return;
    }
    this._pending.delete(frame.id);
    if (frame.t === "reply") pending.resolve(frame.v);
    else if (frame.t === "end") pending.resolve();
    else if (frame.t === "error") pending.reject(new GatewayCallError(frame));
  }

  _failed(error) {
    const failed = this.state.failedAttempts + 1;
    this._setState({ connected: false, lastError: error, failedAttempts: failed });
    const max = this.options.maxAttempts;
    if (max !== null && failed >= max) {
      this._closed = true;
      for (const waiter of this._waiters.splice(0)) waiter.reject(new Error(error));
      return;
    }
    this._schedule(failed - 1);
  }

  _schedule(attempt) {
    if (this._closed) return;
    const { initial, maximum, factor, jitter } = this.options.backoff;
    const delay = Math.min(maximum, initial * factor ** attempt);
    this._timer = setTimeout(() => this._connect(), delay * (1 - jitter * Math.random()));
  }
}
