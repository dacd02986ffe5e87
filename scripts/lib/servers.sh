# shellcheck shell=bash
# The real test servers, Apache Kafka (KRaft) and Apache Cassandra, run from the jars that
# Maven resolves from testkit/servers/pom.xml. Sourced by scripts/test and scripts/dev-stack.
#
#   servers_install                    resolve the jars once into $SERVERS_DIR (cached)
#   kafka_prepare DIR ID PORT CTRL VOTERS [BIND]
#                                      write DIR/server.properties and format DIR/data
#   kafka_run DIR                      exec the broker (run it in the background)
#   cassandra_prepare DIR ADDR CQL_PORT STORAGE_PORT SEEDS
#                                      write DIR/cassandra.yaml and DIR/logback.xml
#   cassandra_run DIR                  exec the node (run it in the background)
#   server_wait NAME PID LOG SECS CHECK...
#                                      wait until CHECK succeeds; on failure print one line
#                                      naming the server and its log, and return 1
#   kafka_ready LOG / cassandra_ready LOG PORT [ADDRESS]
#   cassandra_joined LOG N             the node's gossip sees the other N-1 nodes up
#
# Nothing here downloads anything but Maven artifacts. The JVM flags follow the servers' own
# launch scripts (Kafka's kafka-run-class.sh, Cassandra's jvm-server.options and
# jvm17-server.options), with small heaps for a 2-core test machine.

_servers_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SERVERS_POM="$_servers_root/testkit/servers/pom.xml"
SERVERS_DIR=${MSGHASH_SERVERS_DIR:-${MSGHASH_TOOLS_DIR:-$HOME/.cache/msghash}/servers}
KAFKA_VERSION=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$SERVERS_POM")
CASSANDRA_VERSION=$(sed -n 's:.*<cassandra.version>\(.*\)</cassandra.version>.*:\1:p' "$SERVERS_POM")
KAFKA_HOME="$SERVERS_DIR/kafka-$KAFKA_VERSION"
CASSANDRA_HOME="$SERVERS_DIR/cassandra-$CASSANDRA_VERSION"
JAVA=${MSGHASH_JAVA:-java}

_servers_say() { echo "servers: $*" >&2; }

servers_install() {
  if [ -f "$KAFKA_HOME/.complete" ] && [ -f "$CASSANDRA_HOME/.complete" ]; then
    return 0
  fi
  local major
  major=$("$JAVA" -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n 1)
  if [ -z "$major" ] || [ "$major" -lt 17 ]; then
    _servers_say "Kafka 4 and Cassandra 5 need Java 17 or newer; '$JAVA' is ${major:-missing}"
    return 1
  fi
  if ! command -v mvn >/dev/null 2>&1; then
    _servers_say "Maven (mvn) is needed to resolve the test servers from Maven Central"
    return 1
  fi
  local start
  start=$(date +%s)
  _servers_say "resolving Kafka $KAFKA_VERSION and Cassandra $CASSANDRA_VERSION from Maven Central into $SERVERS_DIR"
  rm -rf "$KAFKA_HOME" "$CASSANDRA_HOME"
  mvn -B -q -f "$SERVERS_POM" dependency:copy-dependencies "-Dservers.dir=$SERVERS_DIR" >&2
  touch "$KAFKA_HOME/.complete" "$CASSANDRA_HOME/.complete"
  _servers_say "resolved in $(( $(date +%s) - start ))s"
}

# kafka_prepare DIR NODE_ID PORT CONTROLLER_PORT VOTERS [ADDRESS]
# One KRaft node in combined mode (broker and controller). VOTERS is
# controller.quorum.voters, e.g. 1@127.0.0.1:19093. Extra properties can be appended to
# DIR/server.properties before kafka_run.
kafka_prepare() {
  local dir=$1 id=$2 port=$3 ctrl=$4 voters=$5 addr=${6:-127.0.0.1}
  local replicas
  replicas=$(( $(tr ',' '\n' <<<"$voters" | wc -l) ))
  mkdir -p "$dir/data"
  cat >"$dir/server.properties" <<EOF
process.roles=broker,controller
node.id=$id
controller.quorum.voters=$voters
listeners=PLAINTEXT://$addr:$port,CONTROLLER://$addr:$ctrl
advertised.listeners=PLAINTEXT://$addr:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$dir/data
num.partitions=1
auto.create.topics.enable=false
offsets.topic.replication.factor=$replicas
offsets.topic.num.partitions=10
transaction.state.log.replication.factor=$replicas
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=$replicas
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
log.segment.bytes=16777216
# A broker that dies is noticed (and its partitions get new leaders) within about 3 s
# instead of 9: a POST waiting through the election still answers within its deadline.
broker.session.timeout.ms=3000
broker.heartbeat.interval.ms=500
EOF
  cat >"$dir/log4j2.properties" <<'EOF'
status = warn
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.out.ref = out
logger.kafka.name = kafka
logger.kafka.level = info
logger.state.name = state.change.logger
logger.state.level = warn
EOF
  # Every node of one cluster must be formatted with the same cluster id: derive it from
  # the voters, so a cluster's nodes agree without passing state around.
  local cluster_id
  cluster_id=$(printf '%s' "$voters" | sha256sum | cut -c1-32 \
    | perl -ne 'use MIME::Base64; chomp; my $b = encode_base64(pack("H*", $_), ""); $b =~ tr{+/=}{-_}d; print $b')
  # `--cluster-id=ID`, not `-t ID`: one id in 64 starts with `-`, which the tool's argument
  # parser takes for an option (`expected one argument`).
  "$JAVA" -cp "$KAFKA_HOME/lib/*" -Dlog4j2.configurationFile="$dir/log4j2.properties" \
    kafka.tools.StorageTool format --cluster-id="$cluster_id" -c "$dir/server.properties" \
    --ignore-formatted \
    >"$dir/format.log" 2>&1 || {
    _servers_say "kafka: formatting $dir/data failed; its log: $dir/format.log"
    return 1
  }
}

kafka_run() {
  local dir=$1
  exec "$JAVA" -Xms256m -Xmx512m -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent \
    -Djava.awt.headless=true -Dlog4j2.configurationFile="$dir/log4j2.properties" \
    -cp "$KAFKA_HOME/lib/*" kafka.Kafka "$dir/server.properties"
}

# cassandra_prepare DIR ADDRESS CQL_PORT STORAGE_PORT SEEDS
cassandra_prepare() {
  local dir=$1 addr=$2 cql=$3 storage=$4 seeds=$5
  mkdir -p "$dir/data" "$dir/commitlog" "$dir/saved_caches" "$dir/hints" "$dir/cdc_raw"
  cat >"$dir/cassandra.yaml" <<EOF
cluster_name: msghash-test
num_tokens: 16
allocate_tokens_for_local_replication_factor: 3
partitioner: org.apache.cassandra.dht.Murmur3Partitioner
data_file_directories: [$dir/data]
commitlog_directory: $dir/commitlog
saved_caches_directory: $dir/saved_caches
hints_directory: $dir/hints
cdc_raw_directory: $dir/cdc_raw
commitlog_sync: periodic
commitlog_sync_period: 10000ms
seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters:
      - seeds: "$seeds"
listen_address: $addr
rpc_address: $addr
storage_port: $storage
native_transport_port: $cql
start_native_transport: true
endpoint_snitch: SimpleSnitch
authenticator: AllowAllAuthenticator
authorizer: AllowAllAuthorizer
# Tests drop many keyspaces; a snapshot of each would only fill the disk.
auto_snapshot: false
# A test machine has little memory and two cores.
concurrent_reads: 8
concurrent_writes: 16
concurrent_counter_writes: 8
key_cache_size: 16MiB
EOF
  cat >"$dir/logback.xml" <<'EOF'
<configuration>
  <appender name="OUT" class="ch.qos.logback.core.ConsoleAppender">
    <encoder><pattern>%-5level [%thread] %date{ISO8601} %F:%L - %msg%n</pattern></encoder>
  </appender>
  <root level="INFO"><appender-ref ref="OUT"/></root>
</configuration>
EOF
}

cassandra_run() {
  local dir=$1 jvm17=()
  # jvm17-server.options: G1 and the module openings Cassandra needs on Java 17.
  jvm17=(
    -XX:+UseG1GC -XX:+ParallelRefProcEnabled -XX:MaxTenuringThreshold=1
    -XX:G1RSetUpdatingPauseTimePercent=5 -XX:MaxGCPauseMillis=300
    -Djdk.attach.allowAttachSelf=true
    --add-exports java.base/jdk.internal.misc=ALL-UNNAMED
    --add-exports java.management.rmi/com.sun.jmx.remote.internal.rmi=ALL-UNNAMED
    --add-exports java.rmi/sun.rmi.registry=ALL-UNNAMED
    --add-exports java.rmi/sun.rmi.server=ALL-UNNAMED
    --add-exports java.sql/java.sql=ALL-UNNAMED
    --add-exports java.base/java.lang.ref=ALL-UNNAMED
    --add-exports jdk.unsupported/sun.misc=ALL-UNNAMED
    --add-exports jdk.compiler/com.sun.tools.javac.file=ALL-UNNAMED
    --add-exports jdk.attach/sun.tools.attach=ALL-UNNAMED
    --add-opens java.base/java.lang.module=ALL-UNNAMED
    --add-opens java.base/jdk.internal.loader=ALL-UNNAMED
    --add-opens java.base/jdk.internal.ref=ALL-UNNAMED
    --add-opens java.base/jdk.internal.reflect=ALL-UNNAMED
    --add-opens java.base/jdk.internal.math=ALL-UNNAMED
    --add-opens java.base/jdk.internal.module=ALL-UNNAMED
    --add-opens java.base/jdk.internal.util.jar=ALL-UNNAMED
    --add-opens jdk.management/com.sun.management.internal=ALL-UNNAMED
    --add-opens java.base/sun.nio.ch=ALL-UNNAMED
    --add-opens java.base/java.io=ALL-UNNAMED
    --add-opens java.base/java.lang.reflect=ALL-UNNAMED
    --add-opens jdk.compiler/com.sun.tools.javac=ALL-UNNAMED
    --add-opens java.base/java.lang=ALL-UNNAMED
    --add-opens java.base/java.util=ALL-UNNAMED
    -Dio.netty.tryReflectionSetAccessible=true
    -Dio.netty.allocator.useCacheForAllThreads=true -Dio.netty.allocator.maxOrder=11
  )
  local jamm
  jamm=$(ls "$CASSANDRA_HOME"/lib/jamm-*.jar 2>/dev/null | head -n 1)
  exec "$JAVA" -ea -da:net.openhft... -XX:+UseThreadPriorities -Xss256k -XX:+UseTLAB \
    -XX:+ResizeTLAB -XX:+PerfDisableSharedMem -XX:+ExitOnOutOfMemoryError -Djava.net.preferIPv4Stack=true \
    -Xms1g -Xmx1g "${jvm17[@]}" ${jamm:+-javaagent:"$jamm"} \
    -Dcassandra.config="file://$dir/cassandra.yaml" -Dcassandra.storagedir="$dir" \
    -Dcassandra.logdir="$dir" -Dlogback.configurationFile="$dir/logback.xml" \
    -Dcassandra-foreground=yes -Dcassandra.skip_wait_for_gossip_to_settle=0 \
    -Dcassandra.superuser_setup_delay_ms=0 -Dcassandra.ring_delay_ms="${MSGHASH_CASSANDRA_RING_DELAY_MS:-1000}" \
    -cp "$CASSANDRA_HOME/lib/*" org.apache.cassandra.service.CassandraDaemon
}

_port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }
kafka_ready() { grep -q 'Kafka Server started' "$1" 2>/dev/null; }
cassandra_ready() {
  grep -q 'Starting listening for CQL clients' "$1" 2>/dev/null && _port_open "${3:-127.0.0.1}" "$2"
}

cassandra_joined() {
  local want=$(( $2 - 1 ))
  [ "$want" -le 0 ] && return 0
  [ "$(grep -o 'InetAddress /[0-9.]*:[0-9]* is now UP' "$1" 2>/dev/null | sort -u | wc -l)" -ge "$want" ]
}

# server_wait NAME PID LOG SECS CHECK...: waits for CHECK; one clear line if it never holds.
server_wait() {
  local name=$1 pid=$2 log=$3 secs=$4; shift 4
  local deadline=$(( $(date +%s) + secs ))
  until "$@"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      _servers_say "$name exited before it was ready; its log: $log"
      return 1
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
      _servers_say "$name was not ready within ${secs}s; its log: $log"
      return 1
    fi
    sleep 0.5
  done
}

# The pair of servers one test run shares: one Kafka broker and one Cassandra node on
# 127.0.0.1. Ports: MSGHASH_TEST_KAFKA_PORT (29092; the controller takes the next one),
# MSGHASH_TEST_CQL_PORT (29042), MSGHASH_TEST_STORAGE_PORT (29000).
#   test_servers_start DIR   start both (data and logs under DIR), return at once
#   test_servers_wait        wait until both answer; exports MSGHASH_TEST_KAFKA/_CQL
#   test_servers_stop        stop both (TERM, then KILL), drop their data, keep the logs
TEST_SERVER_PIDS=()
test_servers_start() {
  _ts_dir=$1
  _ts_kafka=${MSGHASH_TEST_KAFKA_PORT:-29092}
  _ts_cql=${MSGHASH_TEST_CQL_PORT:-29042}
  local storage=${MSGHASH_TEST_STORAGE_PORT:-29000} port
  for port in "$_ts_kafka" "$((_ts_kafka + 1))" "$_ts_cql" "$storage"; do
    if _port_open 127.0.0.1 "$port"; then
      _servers_say "port $port on 127.0.0.1 is taken (another test run, or another server); set MSGHASH_TEST_KAFKA_PORT, MSGHASH_TEST_CQL_PORT or MSGHASH_TEST_STORAGE_PORT"
      return 1
    fi
  done
  rm -rf "$_ts_dir"
  mkdir -p "$_ts_dir/logs"
  kafka_prepare "$_ts_dir/kafka" 1 "$_ts_kafka" "$((_ts_kafka + 1))" "1@127.0.0.1:$((_ts_kafka + 1))"
  (kafka_run "$_ts_dir/kafka") >"$_ts_dir/logs/kafka.log" 2>&1 &
  _ts_kafka_pid=$!
  cassandra_prepare "$_ts_dir/cassandra" 127.0.0.1 "$_ts_cql" "$storage" "127.0.0.1:$storage"
  (cassandra_run "$_ts_dir/cassandra") >"$_ts_dir/logs/cassandra.log" 2>&1 &
  _ts_cassandra_pid=$!
  TEST_SERVER_PIDS=("$_ts_kafka_pid" "$_ts_cassandra_pid")
}

test_servers_wait() {
  server_wait "kafka (127.0.0.1:$_ts_kafka)" "$_ts_kafka_pid" "$_ts_dir/logs/kafka.log" 180 \
    kafka_ready "$_ts_dir/logs/kafka.log" || return 1
  server_wait "cassandra (127.0.0.1:$_ts_cql)" "$_ts_cassandra_pid" "$_ts_dir/logs/cassandra.log" 300 \
    cassandra_ready "$_ts_dir/logs/cassandra.log" "$_ts_cql" || return 1
  export MSGHASH_TEST_KAFKA="127.0.0.1:$_ts_kafka"
  export MSGHASH_TEST_CQL="127.0.0.1:$_ts_cql"
}

test_servers_stop() {
  local pid
  [ "${#TEST_SERVER_PIDS[@]}" -gt 0 ] || return 0
  for pid in "${TEST_SERVER_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for _ in $(seq 1 100); do
    local alive=0
    for pid in "${TEST_SERVER_PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.2
  done
  for pid in "${TEST_SERVER_PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  TEST_SERVER_PIDS=()
  # The data goes (it can be large); the logs stay for a look after a failure.
  rm -rf "$_ts_dir/kafka/data" "$_ts_dir/cassandra/data" "$_ts_dir/cassandra/commitlog"
}
