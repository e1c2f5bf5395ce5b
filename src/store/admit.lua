-- Admission (the `admit` stage, after `pace`), in one round trip. The same rules as
-- policy::admission::admit (Rust); tests/store_conformance.rs holds the two to the same answers.
-- Every key carries the portfolio's hash tag, so this runs unchanged on Redis Cluster.
--
-- KEYS: 1 job record, 2 care window, 3 consent, 4 campaign, 5 template, 6 registry synced,
--       7 tier (zset wa_id -> ms), 8 tier limit, 9 pair state
-- ARGV: 1 owner, 2 now ms, 3 lease ms, 4 job record ttl s, 5 retake stale claims (0/1),
--       6 expires_at ms or '', 7 not_before ms or '', 8 free-form (0/1),
--       9 template in use: '' | 'job' | 'fallback', 10 its parameters are wrong (0/1),
--       11 categories needing an opt-in as ',marketing,utility,', 12 tier limit or '' (unlimited),
--       13 pair period ms, 14 pair burst, 15 care window ms, 16 tier window ms, 17 has campaign (0/1),
--       18 recipient wa_id, 19 busy recheck ms, 20 campaign recheck ms, 21 template recheck ms,
--       22 registry recheck ms, 23 pair margin ms
-- `check_only` (a local the caller defines): decide, but on 'send' return the reply and the
-- function that claims and charges, without calling it. A refusal or deferral is final either
-- way (a stale claim it finds is marked ambiguous).
-- Reply: {'send', fallback 0/1} | {'sent', wamid} | {'done'} | {'ambiguous', since}
--        | {'defer', why, until[, used, limit]} | {'dead', why[, detail...]}
local function ms(x) return string.format('%.0f', x) end
local now = tonumber(ARGV[2])

-- 2. idempotency
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'sent' then return {'sent', redis.call('HGET', KEYS[1], 'wamid')} end
if state == 'dead' then return {'done'} end
if state then
  local at = redis.call('HGET', KEYS[1], 'at')
  if state == 'claimed' and now < tonumber(at) + tonumber(ARGV[3]) then
    return {'defer', 'busy', ms(now + tonumber(ARGV[19]))}
  end
  if ARGV[5] ~= '1' then
    redis.call('HSET', KEYS[1], 'state', 'ambiguous')
    return {'ambiguous', at}
  end
end

-- 3. validity and schedule
if ARGV[6] ~= '' and tonumber(ARGV[6]) <= now then return {'dead', 'expired', ARGV[6]} end
if ARGV[7] ~= '' and tonumber(ARGV[7]) > now then return {'defer', 'not_before', ARGV[7]} end

-- 4. campaign
if ARGV[17] == '1' then
  local campaign = redis.call('HGET', KEYS[4], 'state')
  if campaign == 'paused' then return {'defer', 'campaign_paused', ms(now + tonumber(ARGV[20]))} end
  if campaign == 'cancelled' then return {'dead', 'campaign_cancelled'} end
end

-- 5. care window
local last = redis.call('GET', KEYS[2])
local open = last ~= false and now < tonumber(last) + tonumber(ARGV[15])
local template = ARGV[9]
if ARGV[8] == '1' then
  if open then
    template = ''
  elseif template ~= 'fallback' then
    return {'dead', 'window', last or ''}
  end
end

-- 6. template, 7. consent
if template ~= '' then
  local t = redis.call('HMGET', KEYS[5], 'status', 'category')
  if not t[1] then
    if redis.call('EXISTS', KEYS[6]) == 1 then return {'dead', 'template_unknown'} end
    return {'defer', 'registry', ms(now + tonumber(ARGV[22]))}
  end
  if t[1] == 'PAUSED' then return {'defer', 'template_paused', ms(now + tonumber(ARGV[21]))} end
  if t[1] ~= 'APPROVED' then return {'dead', 'template_status', t[1]} end
  if ARGV[10] == '1' then return {'dead', 'params'} end
  local c = redis.call('HMGET', KEYS[3], 'opt_in_at', 'opt_out_at', 'opt_out_source')
  if t[2] == 'marketing' and c[2] then return {'dead', 'opted_out', c[2], c[3]} end
  if not open and not c[1] and string.find(ARGV[11], ',' .. t[2] .. ',', 1, true) then
    return {'dead', 'no_opt_in', t[2]}
  end
end

-- 8. tier: unique users outside the window in the last 24 h, per portfolio
local tier_window = tonumber(ARGV[16])
if not open then
  redis.call('ZREMRANGEBYSCORE', KEYS[7], '-inf', ms(now - tier_window))
  if not redis.call('ZSCORE', KEYS[7], ARGV[18]) then
    local limit = ARGV[12]
    local stored = redis.call('GET', KEYS[8])
    if stored == 'unlimited' then limit = '' elseif stored then limit = stored end
    if limit ~= '' then
      local used = redis.call('ZCARD', KEYS[7])
      if used >= tonumber(limit) then
        local oldest = redis.call('ZRANGE', KEYS[7], 0, 0, 'WITHSCORES')
        local due = now + tier_window
        if oldest[2] then due = tonumber(oldest[2]) + tier_window end
        if due < now + 1000 then due = now + 1000 end
        return {'defer', 'tier', ms(due), tostring(used), limit}
      end
    end
  end
end

-- 9. pair rate: a burst of up to `burst` within one period, each message borrowing a period;
-- the margin lengthens the spacing and shortens the burst window (PairRate in admission.rs)
local spacing = tonumber(ARGV[13]) + tonumber(ARGV[23])
local burst_window = math.max(tonumber(ARGV[13]) - tonumber(ARGV[23]), 0)
local p = redis.call('HMGET', KEYS[9], 'next', 'start', 'count')
local nxt, start, count = now + spacing, now, 1
if p[1] and now < tonumber(p[1]) then
  if now < tonumber(p[2]) + burst_window and tonumber(p[3]) < tonumber(ARGV[14]) then
    nxt, start, count = tonumber(p[1]) + spacing, tonumber(p[2]), tonumber(p[3]) + 1
  else
    return {'defer', 'pair', p[1]}
  end
end

-- Admitted: claim, charge the pair and the tier; when only checking (`check_only`, set by the
-- caller), that is left to the caller, which books a send slot first.
local function charge()
  redis.call('HSET', KEYS[9], 'next', ms(nxt), 'start', ms(start), 'count', count)
  redis.call('PEXPIREAT', KEYS[9], ms(nxt))
  if not open then
    redis.call('ZADD', KEYS[7], ARGV[2], ARGV[18])
    redis.call('PEXPIRE', KEYS[7], tier_window)
  end
  redis.call('HSET', KEYS[1], 'state', 'claimed', 'owner', ARGV[1], 'at', ARGV[2])
  redis.call('EXPIRE', KEYS[1], ARGV[4])
end
local reply = {'send', '0'}
if template == 'fallback' then reply = {'send', '1'} end
if check_only then return reply, charge end
charge()
return reply
