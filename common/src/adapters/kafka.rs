//! `EventLog` on Kafka, through rdkafka (librdkafka).
//!
//! The producer is idempotent with `acks=all`, so an `append` that returns an offset is on
//! every in-sync replica. The partition is chosen by the caller (`partition_for`), never by
//! librdkafka's partitioner, so every service agrees on where a digest lives.

use crate::ports::{EventLog, LogError, LogRecord, Offset, Subscription};
use crate::MessageHashed;
use async_trait::async_trait;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use rdkafka::TopicPartitionList;
use std::num::NonZeroU32;
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
    /// Replication factor used when msghash creates the topic.
    pub replication_factor: i32,
    /// How long librdkafka may keep retrying one produce before it reports failure.
    pub message_timeout: Duration,
    /// `none`, `gzip`, `snappy`, `lz4` or `zstd`.
    pub compression: String,
    /// Consumer-group session timeout: how soon a crashed projector's partitions move.
    pub session_timeout: Duration,
    /// Create the topic (with `cleanup.policy=compact`) when it does not exist.
    pub create_topic: bool,
    /// Refuse a topic whose `cleanup.policy` is not `compact` (asked with DescribeConfigs).
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
            message_timeout: Duration::from_millis(2_000),
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

/// The Kafka adapter: one shared producer, plus one consumer per subscription.
pub struct KafkaLog {
    settings: KafkaSettings,
    producer: FutureProducer,
}

const METADATA_TIMEOUT: Duration = Duration::from_secs(5);
const WATERMARK_TIMEOUT: Duration = Duration::from_secs(2);

impl KafkaLog {
    /// Creates the producer, makes sure the topic exists with the configured partition count
    /// and fails if it exists with another count (the digest → partition map would change).
    pub async fn connect(settings: KafkaSettings) -> Result<Self, LogError> {
        let timeout_ms = settings.message_timeout.as_millis().max(1).to_string();
        let producer: FutureProducer = settings
            .client_config()
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("linger.ms", "2")
            .set("compression.type", &settings.compression)
            .set("message.timeout.ms", &timeout_ms)
            .set("request.timeout.ms", &timeout_ms)
            .create()
            .map_err(|e| LogError::Rejected(format!("producer configuration: {e}")))?;
        let log = KafkaLog { settings, producer };
        if log.settings.create_topic {
            log.create_topic().await?;
        }
        log.check_partition_count().await?;
        if log.settings.verify_compaction {
            log.check_compaction().await?;
        }
        Ok(log)
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
        // Key = digest and value = a pure function of it, so compaction only ever drops
        // exact duplicates.
        let topic = NewTopic::new(
            &self.settings.topic,
            partitions,
            TopicReplication::Fixed(self.settings.replication_factor),
        )
        .set("cleanup.policy", "compact");
        // Dead letters are few and worth keeping: one partition, no retention limit.
        let dlq_name = self.settings.dead_letter_topic();
        let dlq = NewTopic::new(
            &dlq_name,
            1,
            TopicReplication::Fixed(self.settings.replication_factor),
        )
        .set("retention.ms", "-1");
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

    /// Reads the topic's partition count from the cluster's metadata and compares it with
    /// the configured one. A topic created a moment ago may not be in every broker's
    /// metadata yet (a real broker answers UNKNOWN_TOPIC_OR_PART, or no partitions, for a
    /// short while), so a missing topic is asked again until `METADATA_TIMEOUT` has passed.
    async fn check_partition_count(&self) -> Result<(), LogError> {
        let deadline = Instant::now() + METADATA_TIMEOUT;
        let found = loop {
            match self.partition_count().await {
                Ok(n) if n > 0 => break n,
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
        if found != self.settings.partitions.get() as usize {
            return Err(LogError::Misconfigured(format!(
                "topic {} has {found} partitions but {} are configured; the partition of a \
                 digest depends on the count, so they must match",
                self.settings.topic, self.settings.partitions
            )));
        }
        Ok(())
    }

    async fn partition_count(&self) -> Result<usize, LogError> {
        let producer = self.producer.clone();
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
            Ok(t.partitions().len())
        })
        .await
        .map_err(|e| LogError::Unavailable(format!("metadata task: {e}")))?
    }

    /// The topic must be compacted and nothing else (`cleanup.policy=compact`): the log is
    /// the source of truth, and with `delete` retention would silently drop events that a
    /// replay needs. Compaction loses nothing because the key is the digest and the value a
    /// pure function of it. Asked with DescribeConfigs.
    async fn check_compaction(&self) -> Result<(), LogError> {
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
        Ok(())
    }
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
        match self
            .producer
            .send(record, Timeout::After(self.settings.message_timeout))
            .await
        {
            Ok(delivery) => Ok(delivery.offset),
            Err((e, _)) => Err(unavailable(e)),
        }
    }

    async fn end_offset(&self, partition: u32) -> Result<Offset, LogError> {
        let producer = self.producer.clone();
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
        match self
            .producer
            .send(letter, Timeout::After(self.settings.message_timeout))
            .await
        {
            Ok(_) => Ok(()),
            Err((e, _)) => Err(unavailable(e)),
        }
    }

    async fn dead_letter_count(&self) -> Result<u64, LogError> {
        let producer = self.producer.clone();
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
        let consumer: StreamConsumer = self
            .settings
            .client_config()
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set("session.timeout.ms", &session_ms)
            .set("heartbeat.interval.ms", &heartbeat_ms)
            .create()
            .map_err(|e| LogError::Rejected(format!("consumer configuration: {e}")))?;
        consumer
            .subscribe(&[&self.settings.topic])
            .map_err(unavailable)?;
        Ok(Box::new(KafkaSubscription {
            consumer: Arc::new(consumer),
            topic: self.settings.topic.clone(),
        }))
    }
}

struct KafkaSubscription {
    consumer: Arc<StreamConsumer>,
    topic: String,
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
}
