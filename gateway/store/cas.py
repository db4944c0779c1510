"""The compare-and-set scripts every write of a record or consent value runs: the value is
written only if it is still the one read, so two writers never lose each other's change
(the loser reads again and retries, at most `CAS_ATTEMPTS` times).
"""

from __future__ import annotations

import hashlib
from typing import Final

# Concurrent writers of one recipient are rare (a double click, a keyword SMS racing an
# unsubscribe click); n writers in lock-step need n rounds. Beyond this, fail the write.
CAS_ATTEMPTS: Final = 8

# Standalone: KEYS[1] = the change stream, KEYS[2..n+1] = the records' buckets; ARGV = 5 per
# record: its field, the value read ("" = absent), the new value ("" = delete), the entry's
# "e" and "ad" ("" = none). Each record is a compare-and-set; returns, per record, 0 when
# someone else wrote first, else its entry's id. One script runs atomically, so a record
# and its entry are written together or not at all. (A bucket left empty is removed by the
# server itself.)
CAS_SCRIPT = """
local out = {}
for i = 2, #KEYS do
  local j = (i - 2) * 5
  local cur = redis.call('HGET', KEYS[i], ARGV[j + 1]) or ''
  if cur ~= ARGV[j + 2] then
    out[#out + 1] = 0
  else
    if ARGV[j + 3] == '' then redis.call('HDEL', KEYS[i], ARGV[j + 1])
    else redis.call('HSET', KEYS[i], ARGV[j + 1], ARGV[j + 3]) end
    if ARGV[j + 5] == '' then
      out[#out + 1] = redis.call('XADD', KEYS[1], '*', 'e', ARGV[j + 4])
    else
      out[#out + 1] = redis.call('XADD', KEYS[1], '*', 'e', ARGV[j + 4], 'ad', ARGV[j + 5])
    end
  end
end
return out
"""
CAS_SHA: Final = hashlib.sha1(CAS_SCRIPT.encode()).hexdigest()  # noqa: S324 - the script's name
# Cluster: one record, no stream (another slot); returns 1 when written, 0 otherwise.
CAS_ONE_SCRIPT = """
local cur = redis.call('HGET', KEYS[1], ARGV[1]) or ''
if cur ~= ARGV[2] then return 0 end
if ARGV[3] == '' then redis.call('HDEL', KEYS[1], ARGV[1])
else redis.call('HSET', KEYS[1], ARGV[1], ARGV[3]) end
return 1
"""
