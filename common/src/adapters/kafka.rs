//! `EventLog` on Kafka, through rdkafka (librdkafka).
//!
//! The producer is idempotent with `acks=all`, so an `append` that returns an offset is on
//! every in-sync replica. The partition is chosen by the caller (`partition_for`), never by
//! librdkafka's partitioner, so every service agrees on where a digest lives.

use crate::ports::{EventLog, LogError, LogRecord, Offset, Subscription};
use crate::MessageHashed;
use async_trait::async_trait;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use rdkafka::TopicPartitionList;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How to reach the topic and how to create it when it is missing.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    /// `host:port[,host:port...]`.
    pub brokers: String,
    pub topic: String,
    pub partitions: NonZeroU32,
    /// Replication factor used when msghash creates the topic, and the least it accepts
    /// of an existing one.
    pub replication_factor: i32,
    /// `min.insync.replicas` used when msghash creates the topic, and the least it accepts
    /// of an existing one. At most `replication_factor`.
    pub min_insync_replicas: i32,
    /// How long librdkafka may keep trying to deliver one event (through a leader
    /// election, a broker restart) before it reports failure. Longer than any request
    /// deadline: a client that stopped waiting gets its 503, and the event, if delivered,
    /// is a harmless duplicate of the one its retry appends.
    pub message_timeout: Duration,
    /// The largest record the producer sends (`message.max.bytes`), and the least
    /// `max.message.bytes` the topic must accept (set when msghash creates it, checked at
    /// start). ingest derives it from its body limit, so that whatever body it accepts
    /// makes an event the log takes.
    pub max_message_bytes: usize,
    /// `none`, `gzip`, `snappy`, `lz4` or `zstd`.
    pub compression: String,
    /// Consumer-group session timeout: how soon a crashed projector's partitions move.
    pub session_timeout: Duration,
    /// Create the topic (with `cleanup.policy=compact`) when it does not exist.
    pub create_topic: bool,
    /// Refuse a topic whose `cleanup.policy` is not `compact`, or whose
    /// `min.insync.replicas` is below `min_insync_replicas` (asked with DescribeConfigs).
    /// Always on in the services; off only for librdkafka's mock cluster, which cannot
    /// describe configs.
    pub verify_compaction: bool,
}

impl KafkaSettings {
    /// Settings for a local broker, handy in tests.
    pub fn local(
        brokers: impl Into<String>,
        topic: impl Into<String>,
        partitions: NonZeroU32,
    ) -> Self {
        KafkaSettings {
            brokers: brokers.into(),
            topic: topic.into(),
            partitions,
            replication_factor: 1,
            min_insync_replicas: 1,
            message_timeout: Duration::from_secs(30),
            max_message_bytes: max_message_bytes_for(1024 * 1024),
            compression: "lz4".into(),
            session_timeout: Duration::from_secs(10),
            create_topic: true,
            verify_compaction: true,
        }
    }

    /// Where undecodable records go: `<topic>-dlq`, one partition, kept forever.
    pub fn dead_letter_topic(&self) -> String {
        format!("{}-dlq", self.topic)
    }

    fn producer(&self) -> Result<FutureProducer, LogError> {
        let timeout_ms = self.message_timeout.as_millis().max(1).to_string();
        self.client_config()
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("linger.ms", "2")
            .set("compression.type", &self.compression)
            .set("message.timeout.ms", &timeout_ms)
            // One produce request to a broker that does not answer: give up on it (and try
            // the partition's new leader) well before the request deadline.
            .set("request.timeout.ms", "3000")
            .set("message.max.bytes", self.max_message_bytes.to_string())
            .create()
            .map_err(|e| LogError::Rejected(format!("producer configuration: {e}")))
    }

    fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            // A broker that went away must surface within the request deadline, not after
            // librdkafka's default 10 s reconnect backoff.
            .set("reconnect.backoff.ms", "50")
            .set("reconnect.backoff.max.ms", "1000")
            .set("socket.connection.setup.timeout.ms", "3000")
            .set("log_level", "4");
        c
    }
}

/// Room for an event's envelope and the record's key and headers around a message.
const EVENT_OVERHEAD_BYTES: usize = 64 * 1024;

/// The `max_message_bytes` that makes every request body of at most `body_limit` bytes an
/// event the log accepts. An event's JSON is never longer than the request body that
/// carried its message (serde escapes no character longer than JSON forces a client to),
/// plus the envelope.
pub fn max_message_bytes_for(body_limit: usize) -> usize {
    body_limit.saturating_add(EVENT_OVERHEAD_BYTES)
}

/// The Kafka adapter: one shared producer, plus one consumer per subscription.
pub struct KafkaLog {
    settings: KafkaSettings,
    /// Replaced when librdkafka reports a fatal error (the idempotent producer can no longer
    /// promise order and no duplicates, and refuses every further event).
    producer: std::sync::RwLock<FutureProducer>,
}

const METADATA_TIMEOUT: Duration = Duration::from_secs(5);
const WATERMARK_TIMEOUT: Duration = Duration::from_secs(2);

impl KafkaLog {
    /// Creates the producer, makes sure the topic exists with the configured partition count
    /// and fails if it exists with another count (the digest → partition map would change).
    pub async fn connect(settings: KafkaSettings) -> Result<Self, LogError> {
        let producer = settings.producer()?;
        if settings.min_insync_replicas > settings.replication_factor {
            return Err(LogError::Misconfigured(format!(
                "MSGHASH_TOPIC_MIN_ISR ({}) is above MSGHASH_TOPIC_REPLICATION ({}): the \
                 broker could never acknowledge an event",
                settings.min_insync_replicas, settings.replication_factor
            )));
        }
        let log = KafkaLog {
            settings,
            producer: std::sync::RwLock::new(producer),
        };
        if log.settings.create_topic {
            log.create_topic().await?;
        }
        log.check_partitions().await?;
        if log.settings.verify_compaction {
            log.check_topic_configs().await?;
        }
        Ok(log)
    }

    /// The current producer.
    fn producer(&self) -> FutureProducer {
        self.producer
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The current producer, unless it is fatally failed (then the log is unavailable, and
    /// readiness says so, until `send_failed` has replaced it).
    fn usable_producer(&self) -> Result<FutureProducer, LogError> {
        let producer = self.producer();
        match producer.client().fatal_error() {
            Some((_, reason)) => Err(LogError::Unavailable(format!(
                "producer fatal error: {reason}"
            ))),
            None => Ok(producer),
        }
    }

    /// What a failed send means. After a fatal error of `used` (it refuses every further
    /// event) a new producer replaces it, once; until that works the log is unavailable,
    /// and readiness says so.
    fn send_failed(&self, used: &FutureProducer, e: KafkaError) -> LogError {
        if let Some((code, reason)) = used.client().fatal_error() {
            let mut current = self
                .producer
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if current.client().native_ptr() == used.client().native_ptr() {
                tracing::error!(%code, %reason, "the producer hit a fatal error; replacing it");
                match self.settings.producer() {
                    Ok(fresh) => *current = fresh,
                    Err(e) => tracing::error!(error = %e, "cannot create a new producer"),
                }
            }
            return LogError::Unavailable(format!("producer fatal error: {reason}"));
        }
        match e {
            KafkaError::MessageProduction(
                RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize,
            ) => LogError::TooLarge(e.to_string()),
            e => unavailable(e),
        }
    }

    /// Test hook: makes the current producer fail as after a fatal error of librdkafka's
    /// idempotence guard (which a healthy broker cannot be made to cause on demand).
    #[doc(hidden)]
    pub fn raise_fatal_error_for_tests(&self) {
        let producer = self.producer();
        let reason = c"raised by a test";
        // SAFETY: the client pointer is valid while `producer` lives; the reason is a
        // NUL-terminated string that librdkafka copies.
        unsafe {
            rdkafka::bindings::rd_kafka_test_fatal_error(
                producer.client().native_ptr(),
                rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
                reason.as_ptr(),
            );
        }
    }

    pub fn settings(&self) -> &KafkaSettings {
        &self.settings
    }

    fn admin(&self) -> Result<AdminClient<DefaultClientContext>, LogError> {
        self.settings
            .client_config()
            .create()
            .map_err(|e| LogError::Rejected(format!("admin client: {e}")))
    }

    async fn create_topic(&self) -> Result<(), LogError> {
        let admin = self.admin()?;
        let partitions = i32::try_from(self.settings.partitions.get())
            .map_err(|_| LogError::Rejected("partition count too large".into()))?;
        let min_isr = self.settings.min_insync_replicas.to_string();
        let max_bytes = self.settings.max_message_bytes.to_string();
        // Key = digest and value = a pure function of it, so compaction only ever drops
        // exact duplicates.
        let topic = NewTopic::new(
            &self.settings.topic,
            partitions,
            TopicReplication::Fixed(self.settings.replication_factor),
        )
        .set("cleanup.policy", "compact")
        .set("min.insync.replicas", &min_isr)
        .set("max.message.bytes", &max_bytes);
        // Dead letters are few and worth keeping: one partition, no retention limit.
        let dlq_name = self.settings.dead_letter_topic();
        let dlq = NewTopic::new(
            &dlq_name,
            1,
            TopicReplication::Fixed(self.settings.replication_factor),
        )
        .set("retention.ms", "-1")
        .set("min.insync.replicas", &min_isr)
        .set("max.message.bytes", &max_bytes);
        let opts = AdminOptions::new()
            .operation_timeout(Some(METADATA_TIMEOUT))
            .request_timeout(Some(METADATA_TIMEOUT));
        match admin.create_topics([&topic, &dlq], &opts).await {
            Ok(results) => {
                for result in results {
                    match result {
                        Ok(name) => tracing::info!(topic = %name, "created topic"),
                        Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                        // Some brokers (and the mock cluster) do not create topics through
                        // the admin API; the partition check below decides.
                        Err((name, code)) => {
                            tracing::warn!(topic = %name, error = %code, "could not create topic")
                        }
                    }
                }
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, "create topics request failed");
                Ok(())
            }
        }
    }

    /// Reads the topic's partitions from the cluster's metadata and compares their count
    /// and replication with the configured ones. A topic created a moment ago may not be in
    /// every broker's metadata yet (a real broker answers UNKNOWN_TOPIC_OR_PART, or no
    /// partitions, for a short while), so a missing topic is asked again until
    /// `METADATA_TIMEOUT` has passed.
    async fn check_partitions(&self) -> Result<(), LogError> {
        let deadline = Instant::now() + METADATA_TIMEOUT;
        let shape = loop {
            match self.topic_shape().await {
                Ok(shape) if shape.partitions > 0 => break shape,
                Ok(_) | Err(LogError::Rejected(_)) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Ok(_) => {
                    return Err(LogError::Rejected(format!(
                        "topic {} has no partitions",
                        self.settings.topic
                    )))
                }
                Err(e) => return Err(e),
            }
        };
        let topic = &self.settings.topic;
        if shape.partitions != self.settings.partitions.get() as usize {
            return Err(LogError::Misconfigured(format!(
                "topic {topic} has {} partitions but {} are configured; the partition of a \
                 digest depends on the count, so they must match",
                shape.partitions, self.settings.partitions
            )));
        }
        let wanted = usize::try_from(self.settings.replication_factor).unwrap_or(usize::MAX);
        if shape.least_replicas < wanted {
            return Err(LogError::Misconfigured(format!(
                "topic {topic} has a partition with {} replicas but MSGHASH_TOPIC_REPLICATION \
                 is {}: an event acknowledged there survives fewer broker losses than \
                 configured (kafka-reassign-partitions.sh can add replicas)",
                shape.least_replicas, self.settings.replication_factor
            )));
        }
        Ok(())
    }

    async fn topic_shape(&self) -> Result<TopicShape, LogError> {
        let producer = self.producer();
        let topic = self.settings.topic.clone();
        tokio::task::spawn_blocking(move || {
            let metadata = producer
                .client()
                .fetch_metadata(Some(&topic), METADATA_TIMEOUT)
                .map_err(|e| LogError::Unavailable(format!("metadata: {e}")))?;
            let t = metadata
                .topics()
                .iter()
                .find(|t| t.name() == topic)
                .ok_or_else(|| LogError::Rejected(format!("topic {topic} does not exist")))?;
            if let Some(err) = t.error() {
                return Err(LogError::Rejected(format!(
                    "topic {topic}: {}",
                    RDKafkaErrorCode::from(err)
                )));
            }
            Ok(TopicShape {
                partitions: t.partitions().len(),
                least_replicas: t
                    .partitions()
                    .iter()
                    .map(|p| p.replicas().len())
                    .min()
                    .unwrap_or_default(),
            })
        })
        .await
        .map_err(|e| LogError::Unavailable(format!("metadata task: {e}")))?
    }

    /// The topic must be compacted and nothing else (`cleanup.policy=compact`): the log is
    /// the source of truth, and with `delete` retention would silently drop events that a
    /// replay needs. Compaction loses nothing because the key is the digest and the value a
    /// pure function of it. Asked with DescribeConfigs.
    ///
    /// And its `min.insync.replicas` must be at least the configured one: below it, the
    /// broker acknowledges (and ingest answers 201 for) an event that fewer replicas hold.
    async fn check_topic_configs(&self) -> Result<(), LogError> {
        let admin = self.admin()?;
        let opts = AdminOptions::new().request_timeout(Some(METADATA_TIMEOUT));
        let topic = &self.settings.topic;
        let results = admin
            .describe_configs([&ResourceSpecifier::Topic(topic)], &opts)
            .await
            .map_err(|e| LogError::Unavailable(format!("describe configs of {topic}: {e}")))?;
        let resource = results
            .into_iter()
            .next()
            .ok_or_else(|| LogError::Unavailable(format!("no configs returned for {topic}")))?
            .map_err(|code| {
                LogError::Unavailable(format!("describe configs of {topic}: {code}"))
            })?;
        let policy = resource
            .get("cleanup.policy")
            .and_then(|entry| entry.value.clone())
            .unwrap_or_else(|| "delete".into());
        if policy.trim() != "compact" {
            return Err(LogError::Misconfigured(format!(
                "topic {topic} has cleanup.policy={policy} but msghash needs \
                 cleanup.policy=compact: the topic is the source of truth, and a delete \
                 policy would drop events that a replay needs (kafka-configs.sh --alter \
                 --entity-type topics --entity-name {topic} --add-config cleanup.policy=compact)"
            )));
        }
        // A topic that does not set them has the broker's defaults (1 and 1 MB).
        let number = |name: &str, default: usize| {
            resource
                .get(name)
                .and_then(|entry| entry.value.as_deref())
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(default)
        };
        let limits = [
            (
                "min.insync.replicas",
                number("min.insync.replicas", 1),
                usize::try_from(self.settings.min_insync_replicas).unwrap_or(usize::MAX),
                "MSGHASH_TOPIC_MIN_ISR: the broker would acknowledge events that fewer \
                 replicas hold",
            ),
            (
                "max.message.bytes",
                number("max.message.bytes", 1_048_588),
                self.settings.max_message_bytes,
                "the largest event (MSGHASH_BODY_LIMIT plus the envelope): the broker would \
                 refuse large messages that ingest accepts",
            ),
        ];
        for (name, found, wanted, why) in limits {
            if found < wanted {
                return Err(LogError::Misconfigured(format!(
                    "topic {topic} has {name}={found}, below {wanted}, {why} \
                     (kafka-configs.sh --alter --entity-type topics --entity-name {topic} \
                     --add-config {name}={wanted})"
                )));
            }
        }
        Ok(())
    }
}

/// What the metadata says of a topic.
struct TopicShape {
    partitions: usize,
    /// The fewest replicas any of its partitions has.
    least_replicas: usize,
}

fn unavailable(e: KafkaError) -> LogError {
    LogError::Unavailable(e.to_string())
}

#[async_trait]
impl EventLog for KafkaLog {
    fn partitions(&self) -> NonZeroU32 {
        self.settings.partitions
    }

    async fn append(&self, partition: u32, event: &MessageHashed) -> Result<Offset, LogError> {
        let value = event.encode();
        let partition = i32::try_from(partition)
            .map_err(|_| LogError::Rejected(format!("partition {partition} out of range")))?;
        let record = FutureRecord::to(&self.settings.topic)
            .partition(partition)
            .key(event.key())
            .payload(&value);
        let producer = self.producer();
        match producer
            .send(record, Timeout::After(self.settings.message_timeout))
            .await
        {
            Ok(delivery) => Ok(delivery.offset),
            Err((e, _)) => Err(self.send_failed(&producer, e)),
        }
    }

    async fn ready(&self) -> Result<(), LogError> {
        let producer = self.usable_producer()?;
        let topic = self.settings.topic.clone();
        tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(Some(&topic), WATERMARK_TIMEOUT)
                .map(|_| ())
                .map_err(unavailable)
        })
        .await
        .map_err(|e| LogError::Unavailable(format!("metadata task: {e}")))?
    }

    async fn end_offset(&self, partition: u32) -> Result<Offset, LogError> {
        let producer = self.usable_producer()?;
        let topic = self.settings.topic.clone();
        let partition = i32::try_from(partition)
            .map_err(|_| LogError::Rejected(format!("partition {partition} out of range")))?;
        tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_watermarks(&topic, partition, WATERMARK_TIMEOUT)
                .map(|(_low, high)| high)
                .map_err(unavailable)
        })
        .await
        .map_err(|e| LogError::Unavailable(format!("watermark task: {e}")))?
    }

    async fn dead_letter(&self, record: &LogRecord, reason: &str) -> Result<(), LogError> {
        let topic = self.settings.dead_letter_topic();
        let (partition, offset) = (record.partition.to_string(), record.offset.to_string());
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "msghash-reason",
                value: Some(reason),
            })
            .insert(Header {
                key: "msghash-source",
                value: Some(&self.settings.topic),
            })
            .insert(Header {
                key: "msghash-partition",
                value: Some(&partition),
            })
            .insert(Header {
                key: "msghash-offset",
                value: Some(&offset),
            });
        let key = record.key.as_deref().unwrap_or_default();
        let value = record.value.as_deref().unwrap_or_default();
        let letter = FutureRecord::to(&topic)
            .partition(0)
            .key(key)
            .payload(value)
            .headers(headers);
        let producer = self.producer();
        match producer
            .send(letter, Timeout::After(self.settings.message_timeout))
            .await
        {
            Ok(_) => Ok(()),
            Err((e, _)) => Err(self.send_failed(&producer, e)),
        }
    }

    async fn dead_letter_count(&self) -> Result<u64, LogError> {
        let producer = self.producer();
        let topic = self.settings.dead_letter_topic();
        tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_watermarks(&topic, 0, WATERMARK_TIMEOUT)
                .map(|(low, high)| u64::try_from(high - low).unwrap_or_default())
                .map_err(unavailable)
        })
        .await
        .map_err(|e| LogError::Unavailable(format!("watermark task: {e}")))?
    }

    async fn subscribe(&self, group: &str) -> Result<Box<dyn Subscription>, LogError> {
        let session_ms = self
            .settings
            .session_timeout
            .as_millis()
            .max(1000)
            .to_string();
        let heartbeat_ms = (self.settings.session_timeout.as_millis() / 4)
            .clamp(250, 3000)
            .to_string();
        let epoch = Arc::new(AtomicU64::new(0));
        let context = RebalanceWatch {
            epoch: epoch.clone(),
        };
        let consumer: StreamConsumer<RebalanceWatch> = self
            .settings
            .client_config()
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set("session.timeout.ms", &session_ms)
            .set("heartbeat.interval.ms", &heartbeat_ms)
            .create_with_context(context)
            .map_err(|e| LogError::Rejected(format!("consumer configuration: {e}")))?;
        consumer
            .subscribe(&[&self.settings.topic])
            .map_err(unavailable)?;
        Ok(Box::new(KafkaSubscription {
            consumer: Arc::new(consumer),
            topic: self.settings.topic.clone(),
            epoch,
        }))
    }
}

/// Counts the consumer's rebalances, so that the projector knows when its partitions
/// changed (and what it checked of them no longer holds).
struct RebalanceWatch {
    epoch: Arc<AtomicU64>,
}

impl ClientContext for RebalanceWatch {}

impl ConsumerContext for RebalanceWatch {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        match rebalance {
            Rebalance::Assign(list) => {
                let partitions: Vec<i32> = list.elements().iter().map(|e| e.partition()).collect();
                tracing::info!(?partitions, "partitions assigned");
            }
            Rebalance::Revoke(list) => {
                let partitions: Vec<i32> = list.elements().iter().map(|e| e.partition()).collect();
                tracing::info!(?partitions, "partitions revoked");
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance failed"),
        }
    }
}

struct KafkaSubscription {
    consumer: Arc<StreamConsumer<RebalanceWatch>>,
    topic: String,
    epoch: Arc<AtomicU64>,
}

/// After the first record, how long a batch keeps collecting records already on their way.
const BATCH_LINGER: Duration = Duration::from_millis(5);

fn to_record(m: &rdkafka::message::BorrowedMessage<'_>) -> LogRecord {
    LogRecord {
        partition: u32::try_from(m.partition()).unwrap_or_default(),
        offset: m.offset(),
        key: m.key().map(<[u8]>::to_vec),
        value: m.payload().map(<[u8]>::to_vec),
    }
}

#[async_trait]
impl Subscription for KafkaSubscription {
    async fn next_batch(
        &mut self,
        max: usize,
        max_wait: Duration,
    ) -> Result<Vec<LogRecord>, LogError> {
        let mut batch = Vec::new();
        // `recv` is cancellation safe, so timing it out loses nothing.
        match tokio::time::timeout(max_wait, self.consumer.recv()).await {
            Err(_) => return Ok(batch),
            Ok(Err(e)) => return Err(unavailable(e)),
            Ok(Ok(m)) => batch.push(to_record(&m)),
        }
        let linger_until = Instant::now() + BATCH_LINGER;
        while batch.len() < max {
            match tokio::time::timeout_at(linger_until, self.consumer.recv()).await {
                Ok(Ok(m)) => batch.push(to_record(&m)),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "consumer error while filling a batch");
                    break;
                }
                Err(_) => break,
            }
        }
        Ok(batch)
    }

    async fn commit(&mut self, done: &[(u32, Offset)]) -> Result<(), LogError> {
        let mut list = TopicPartitionList::new();
        for &(partition, offset) in done {
            let partition = i32::try_from(partition)
                .map_err(|_| LogError::Rejected(format!("partition {partition} out of range")))?;
            list.add_partition_offset(&self.topic, partition, rdkafka::Offset::Offset(offset + 1))
                .map_err(unavailable)?;
        }
        let consumer = self.consumer.clone();
        tokio::task::spawn_blocking(move || consumer.commit(&list, CommitMode::Sync))
            .await
            .map_err(|e| LogError::Unavailable(format!("commit task: {e}")))?
            .map_err(unavailable)
    }

    async fn rewind(&mut self, partition: u32, offset: Offset) -> Result<(), LogError> {
        let partition = i32::try_from(partition)
            .map_err(|_| LogError::Rejected(format!("partition {partition} out of range")))?;
        let (consumer, topic) = (self.consumer.clone(), self.topic.clone());
        // librdkafka drops what it had fetched for the partition before the seek.
        tokio::task::spawn_blocking(move || {
            consumer.seek(
                &topic,
                partition,
                rdkafka::Offset::Offset(offset.max(0)),
                Timeout::After(Duration::from_secs(10)),
            )
        })
        .await
        .map_err(|e| LogError::Unavailable(format!("seek task: {e}")))?
        .map_err(unavailable)
    }

    fn assignment_epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }
}
