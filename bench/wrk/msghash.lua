-- wrk script of scripts/bench: one script for every phase, so that msghash and the
-- reference server are driven by exactly the same Lua work per request.
--
-- Environment (read in each thread):
--   BENCH_MODE     get   GET /messages/<digest> for digests picked from BENCH_DIGESTS
--                        (hits) mixed with random unknown digests (misses), BENCH_MISS_PCT
--                        percent of them (0 = hits only, 100 = misses only);
--                  post  POST /messages with a unique 66-character message each time;
--                  fixed GET BENCH_PATH (the reference server's fixed answer).
--   BENCH_DIGESTS  file of 64-hex digests, one a line (get mode)
--   BENCH_MISS_PCT 0..100 (get mode)
--   BENCH_PATH     path of fixed mode (default /)
--   BENCH_OK       comma-separated statuses that count as success (e.g. "200" or "200,404")
--   BENCH_NONCE    makes POST bodies unique across runs
--
-- done() prints one line `BENCH_JSON {...}` with requests, req_s, latency percentiles (ms),
-- the unexpected statuses and socket errors.

local threads = {}
local counter = 1

function setup(thread)
  thread:set("id", counter)
  table.insert(threads, thread)
  counter = counter + 1
end

local mode, ok, requests, nreq, next_req, seq, nonce
-- post mode: the request up to its message, the message's fixed start and its padding.
local post_head, post_prefix, pads
-- A POST's message is MESSAGE_LEN characters: the answer to a GET of it is 80 bytes, like
-- the reference's.
local MESSAGE_LEN = 66
-- Globals, read by done() through thread:get().
bad, statuses = 0, {}

local function random_hex(n)
  local t = {}
  for i = 1, n do t[i] = string.format("%x", math.random(0, 15)) end
  return table.concat(t)
end

function init(args)
  mode = os.getenv("BENCH_MODE") or "fixed"
  nonce = os.getenv("BENCH_NONCE") or tostring(os.time())
  math.randomseed(os.time() * 1000 + id)
  ok = {}
  for s in string.gmatch(os.getenv("BENCH_OK") or "200", "%d+") do ok[tonumber(s)] = true end
  bad, seq, statuses = 0, 0, {}
  requests, nreq, next_req = {}, 0, 1
  if mode == "get" then
    local digests = {}
    local file = os.getenv("BENCH_DIGESTS")
    if file then
      for line in io.lines(file) do
        if #line == 64 then digests[#digests + 1] = line end
      end
    end
    local miss = tonumber(os.getenv("BENCH_MISS_PCT") or "0")
    -- Pre-format up to 20,000 requests per thread; request() then only cycles through
    -- them, so the Lua cost per request is the same as in fixed mode.
    local n = math.min(20000, math.max(#digests, 1000))
    for i = 1, n do
      local d
      if #digests == 0 or math.random(1, 100) <= miss then
        d = random_hex(64)
      else
        d = digests[math.random(1, #digests)]
      end
      requests[i] = wrk.format("GET", "/messages/" .. d)
    end
  elseif mode == "post" then
    -- Format the request once with a placeholder body of the right length and keep what
    -- comes before the body: request() then only concatenates. wrk.format per request
    -- (a headers table merged and a string built each time) cost wrk about twice the CPU
    -- of a GET, taken from the same two cores as the server under test.
    local body_len = #'{"message":""}' + MESSAGE_LEN
    local whole = wrk.format("POST", "/messages", {["Content-Type"] = "application/json"},
      string.rep("x", body_len))
    post_head = whole:sub(1, #whole - body_len) .. '{"message":"'
    post_prefix = string.format("bench-%s-%d-", nonce, id)
    pads = {}
    for n = 0, MESSAGE_LEN do pads[n] = string.rep("x", n) end
  elseif mode == "fixed" then
    requests[1] = wrk.format("GET", os.getenv("BENCH_PATH") or "/")
  end
  nreq = #requests
  -- Stagger the threads' starting points.
  if nreq > 0 then next_req = math.random(1, nreq) end
end

function request()
  if mode == "post" then
    -- A unique message each time: the thread's prefix, a sequence number, padding.
    seq = seq + 1
    local m = post_prefix .. seq .. "-"
    local pad = pads[MESSAGE_LEN - #m]
    if pad == nil then
      error("bench: BENCH_NONCE is too long for a " .. MESSAGE_LEN .. "-character message")
    end
    return post_head .. m .. pad .. '"}'
  end
  local r = requests[next_req]
  next_req = next_req + 1
  if next_req > nreq then next_req = 1 end
  return r
end

function response(status, headers, body)
  if not ok[status] then bad = bad + 1 end
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local unexpected, by_status = 0, {}
  for _, t in ipairs(threads) do
    unexpected = unexpected + (t:get("bad") or 0)
    local s = t:get("statuses")
    if s then
      for k, v in pairs(s) do by_status[k] = (by_status[k] or 0) + v end
    end
  end
  local parts = {}
  for k, v in pairs(by_status) do parts[#parts + 1] = string.format('"%d":%d', k, v) end
  local e = summary.errors
  local secs = summary.duration / 1e6
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_s":%.3f,"req_s":%.1f,' ..
    '"p50_ms":%.3f,"p90_ms":%.3f,"p99_ms":%.3f,"p999_ms":%.3f,"max_ms":%.3f,' ..
    '"unexpected_status":%d,"statuses":{%s},' ..
    '"socket_errors":{"connect":%d,"read":%d,"write":%d,"timeout":%d}}\n',
    summary.requests, secs, summary.requests / secs,
    latency:percentile(50) / 1000, latency:percentile(90) / 1000,
    latency:percentile(99) / 1000, latency:percentile(99.9) / 1000, latency.max / 1000,
    unexpected, table.concat(parts, ","),
    e.connect, e.read, e.write, e.timeout))
end
