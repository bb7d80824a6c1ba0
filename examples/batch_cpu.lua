-- A CPU batch pipeline with tide.data, no model needed: text files are read
-- in parallel blocks, empty lines dropped, lines lower-cased, then a pool of
-- two actors (each loads its "model" — here a table of stop words — once,
-- in init) scores batches of lines; the results land in ordered JSONL part
-- files. The input is the King James Bible (Debian's bible-kjv-text), split
-- into a few files, or generated text when that package is missing.
--
--   tide run examples/batch_cpu.lua [output dir]
local tide = require("tide")
local data = require("tide.data")

local TMP = os.getenv("TMPDIR") or "/tmp"
local work = TMP .. "/tide-batch-cpu-" .. tide.get_runtime_context().pid
local out = (arg and arg[1]) or (work .. "/out")
os.execute("mkdir -p '" .. work .. "/in'")

-- The input: four text files.
local text = require("tide.nn.corpus").bible_kjv({max_bytes = 4000000})
if not text then
  local words, lines = {"light", "water", "land", "said", "and", "the", "of", "day", "night"}, {}
  for i = 1, 100000 do
    lines[i] = words[i % 9 + 1] .. " " .. words[(i * 7) % 9 + 1] .. " " .. words[(i * 5) % 9 + 1]
    if i % 10 == 0 then lines[i] = "" end
  end
  text = table.concat(lines, "\n")
end
local quarter = math.floor(#text / 4)
for i = 1, 4 do
  local f = assert(io.open(string.format("%s/in/part%d.txt", work, i), "wb"))
  f:write(text:sub((i - 1) * quarter + 1, i == 4 and #text or i * quarter))
  f:close()
end

local stats = data.read_lines(work .. "/in/*.txt", {block_bytes = 256 * 1024})
  :filter(function(row) return row.text:find("%S") ~= nil end)
  :map(function(row) return {text = row.text:lower(), file = row.path:match("[^/]+$"), line = row.line} end)
  :map_batches({
    init = function(self)
      self.stop = {}
      for w in ("the and of to that in he shall unto for i his a lord they be is him not them it with all")
        :gmatch("%a+") do self.stop[w] = true end
    end,
    call = function(self, batch)
      for _, row in ipairs(batch) do
        local words, content = 0, 0
        for w in row.text:gmatch("%a+") do
          words = words + 1
          if not self.stop[w] then content = content + 1 end
        end
        row.words, row.content_ratio = words, words > 0 and content / words or 0
      end
      return batch
    end,
  }, {batch_size = 512, concurrency = 2})
  :write_jsonl(out)

print(stats)
print(string.format("%d rows written to %s (%d files)", stats.rows, out, #stats.files))
local f = assert(io.open(stats.files[1], "rb"))
print("first row: " .. f:read("*l"))
f:close()
os.execute("rm -rf '" .. work .. "/in'")
