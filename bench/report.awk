# Turns bench/run.sh's raw measurements into WORKDIR/results.md and WORKDIR/results.json.
# Input files (tab-separated):
#   rows.tsv   run  step  tool  wall_s  cpu_s  rss_mib  cache
#   sizes.tsv  run  tool  after  bytes
# Variables (-v): md, js, notes_file, date, runs, tools, size, size_bytes, base_used, base_alloc,
# clone_used, clone_alloc, day2_used, day2_alloc, rewritten, sha_bps, cpu, ncpu, mem, kernel,
# v_restic, v_borg, v_cairn, v_openssl, cache.
# Every reported number is the median over the runs, except peak RSS (the highest). Rows of run 0
# (the warm-up repetition) are skipped.
# Plain POSIX awk (Debian's default mawk): no asort, no arrays of arrays.

function mib(b) { return sprintf("%.1f", b / 1048576) }
function ratio(x, r) { return (r > 0 && x != "") ? sprintf("%.2f", x / r) : "" }
function jstr(s) { gsub(/\\/, "\\\\", s); gsub(/"/, "\\\"", s); return "\"" s "\"" }
function jnum(s) { return (s == "") ? "null" : s }

# median(prefix, n): median of vals[prefix, 1..n] (insertion sort on a copy).
function median(prefix, n,    i, j, t, a) {
    if (n == 0) return ""
    for (i = 1; i <= n; i++) a[i] = vals[prefix, i] + 0
    for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
    return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
}
function add(prefix, v) { cnt[prefix]++; vals[prefix, cnt[prefix]] = v }

# Repetition 0 is the warm-up: not reported.
$1 == 0 { next }

FILENAME ~ /rows\.tsv$/ {
    step = $2; tool = $3; k = step SUBSEP tool
    if (!(step in step_seen)) { step_seen[step] = 1; steps[++nsteps] = step }
    if (!(tool in tool_seen)) { tool_seen[tool] = 1; alltools[++nalltools] = tool }
    if (!(k in key_seen)) key_seen[k] = 1
    add("wall" SUBSEP k, $4); add("cpu" SUBSEP k, $5)
    if ($6 + 0 > rss[k]) rss[k] = $6 + 0
    if ($7 != "cold") warm = 1
    next
}
FILENAME ~ /sizes\.tsv$/ {
    k = $2 SUBSEP $3
    if (!(k in size_seen)) { size_seen[k] = 1 }
    add("size" SUBSEP k, $4)
    next
}

function W(step, tool) { return median("wall" SUBSEP step SUBSEP tool, cnt["wall" SUBSEP step SUBSEP tool]) }
function C(step, tool) { return median("cpu" SUBSEP step SUBSEP tool, cnt["cpu" SUBSEP step SUBSEP tool]) }
function S(tool, after) { return median("size" SUBSEP tool SUBSEP after, cnt["size" SUBSEP tool SUBSEP after]) }
# The restic step a Cairn-only variant is compared with (restic 0.14 never syncs a restore).
function ref_step(step) { return (step == "restore day2 --no-sync") ? "restore day2" : step }
function fmt(x) { return (x == "") ? "" : sprintf("%.2f", x) }

END {
    while ((getline line < notes_file) > 0) notes[++nn] = line
    ntools = split(tools, tl, " ")

    # ---- Markdown ----
    printf "# Backup benchmark results\n\n" > md
    printf "%s. Corpus %s: base.raw %s MiB used in ext4 (%s MiB allocated), clone.raw %s MiB (%s), day2.raw %s MiB (%s); day 2 rewrote %s MiB in place.\n", \
        date, size, mib(base_used), mib(base_alloc), mib(clone_used), mib(clone_alloc), mib(day2_used), mib(day2_alloc), mib(rewritten) > md
    printf "Machine: %s vCPU (%s), %s GiB RAM, Linux %s.\n", ncpu, cpu, mem, kernel > md
    printf "Versions: restic %s, borg %s, cairn %s, OpenSSL %s.\n", v_restic, v_borg, v_cairn, v_openssl > md
    printf "Page cache dropped before each timed step: %s. Runs: %s.\n\n", cache, runs > md
    for (i = 1; i <= nn; i++) printf "> %s\n", notes[i] > md
    if (nn) printf "\n" > md

    printf "## Steps\n\n| step | tool | wall s | CPU s | peak RSS MiB | wall / restic |\n|---|---|--:|--:|--:|--:|\n" > md
    for (s = 1; s <= nsteps; s++) for (t = 1; t <= ntools; t++) {
        k = steps[s] SUBSEP tl[t]
        if (!(k in key_seen)) continue
        printf "| %s | %s | %s | %s | %d | %s |\n", steps[s], tl[t], fmt(W(steps[s], tl[t])), fmt(C(steps[s], tl[t])), rss[k], ratio(W(steps[s], tl[t]), W(ref_step(steps[s]), "restic")) > md
    }

    printf "\n## Repository size (du -sb)\n\n" > md
    printf "| tool | after base MiB | after clone MiB | after day2 MiB | added by clone MiB | added by day2 MiB | total / restic |\n|---|--:|--:|--:|--:|--:|--:|\n" > md
    for (t = 1; t <= ntools; t++) {
        x = tl[t]
        if (!((x SUBSEP "day2") in size_seen)) continue
        printf "| %s | %s | %s | %s | %s | %s | %s |\n", x, mib(S(x, "base")), mib(S(x, "clone")), mib(S(x, "day2")), \
            mib(S(x, "clone") - S(x, "base")), mib(S(x, "day2") - S(x, "clone")), ratio(S(x, "day2"), S("restic", "day2")) > md
    }

    printf "\n## Machine floor\n\n| step | wall s | CPU s | peak RSS MiB |\n|---|--:|--:|--:|\n" > md
    for (s = 1; s <= nsteps; s++) if ((steps[s] SUBSEP "floor") in key_seen)
        printf "| %s | %s | %s | %d |\n", steps[s], fmt(W(steps[s], "floor")), fmt(C(steps[s], "floor")), rss[steps[s] SUBSEP "floor"] > md
    if (sha_bps > 0)
        printf "\nOpenSSL SHA-256 runs at %.0f MiB/s on one core: hashing only the %s MiB allocated in base.raw takes at least %.2f s.\n", \
            sha_bps / 1048576, mib(base_alloc), base_alloc / sha_bps > md

    if ("cairn-qcow2" in tool_seen) {
        printf "\n## Cairn from qcow2 images (separate repository: base.qcow2, then day2.qcow2)\n\n| step | wall s | CPU s | peak RSS MiB |\n|---|--:|--:|--:|\n" > md
        for (s = 1; s <= nsteps; s++) if ((steps[s] SUBSEP "cairn-qcow2") in key_seen)
            printf "| %s | %s | %s | %d |\n", steps[s], fmt(W(steps[s], "cairn-qcow2")), fmt(C(steps[s], "cairn-qcow2")), rss[steps[s] SUBSEP "cairn-qcow2"] > md
        printf "\nRepository size: %s MiB after base.qcow2, %s MiB after day2.qcow2.\n", mib(S("cairn-qcow2", "base")), mib(S("cairn-qcow2", "day2")) > md
    }

    nchunk = 0
    for (t = 1; t <= nalltools; t++) if (alltools[t] ~ /^cairn-chunk-/) chunk[++nchunk] = alltools[t]
    if (nchunk) {
        printf "\n## Cairn chunk sizes (one run each: base, clone, day2 into one repository)\n\n" > md
        printf "| chunk size | backup base s | backup clone s | backup day2 s | repo after day2 MiB | added by day2 MiB |\n|---|--:|--:|--:|--:|--:|\n" > md
        for (c = 1; c <= nchunk; c++) {
            x = chunk[c]; label = x; sub(/^cairn-chunk-/, "", label)
            printf "| %s | %s | %s | %s | %s | %s |\n", label, fmt(W("backup base", x)), fmt(W("backup clone", x)), fmt(W("backup day2", x)), \
                mib(S(x, "day2")), mib(S(x, "day2") - S(x, "clone")) > md
        }
    }

    # ---- JSON ----
    printf "{\n  \"date\": %s,\n  \"runs\": %s,\n  \"tools\": %s,\n", jstr(date), runs, jstr(tools) > js
    printf "  \"corpus\": {\"size\": %s, \"size_bytes\": %s, \"base_fs_used\": %s, \"base_allocated\": %s, \"clone_fs_used\": %s, \"clone_allocated\": %s, \"day2_fs_used\": %s, \"day2_allocated\": %s, \"day2_rewritten\": %s},\n", \
        jstr(size), size_bytes, base_used, base_alloc, clone_used, clone_alloc, day2_used, day2_alloc, rewritten > js
    printf "  \"machine\": {\"cpus\": %s, \"cpu\": %s, \"mem_gib\": %s, \"kernel\": %s, \"cache_dropped\": %s},\n", \
        ncpu, jstr(cpu), mem, jstr(kernel), (cache == "yes") ? "true" : "false" > js
    printf "  \"versions\": {\"restic\": %s, \"borg\": %s, \"cairn\": %s, \"openssl\": %s},\n", jstr(v_restic), jstr(v_borg), jstr(v_cairn), jstr(v_openssl) > js
    printf "  \"sha256_bytes_per_s\": %s,\n  \"steps\": [", sha_bps + 0 > js
    first = 1
    for (s = 1; s <= nsteps; s++) for (t = 1; t <= nalltools; t++) {
        k = steps[s] SUBSEP alltools[t]
        if (!(k in key_seen)) continue
        p = "wall" SUBSEP k; runs_list = ""
        for (i = 1; i <= cnt[p]; i++) runs_list = runs_list ((i > 1) ? ", " : "") vals[p, i]
        printf "%s\n    {\"step\": %s, \"tool\": %s, \"wall_s\": %s, \"cpu_s\": %s, \"peak_rss_mib\": %d, \"wall_ratio_to_restic\": %s, \"wall_s_runs\": [%s]}", \
            first ? "" : ",", jstr(steps[s]), jstr(alltools[t]), W(steps[s], alltools[t]), C(steps[s], alltools[t]), rss[k], \
            jnum(ratio(W(steps[s], alltools[t]), W(ref_step(steps[s]), "restic"))), runs_list > js
        first = 0
    }
    printf "\n  ],\n  \"repository_sizes\": [" > js
    first = 1
    for (t = 1; t <= nalltools + 0; t++) {
        x = alltools[t]
        split("base clone day2", afters, " ")
        for (a = 1; a <= 3; a++) {
            if (!((x SUBSEP afters[a]) in size_seen)) continue
            printf "%s\n    {\"tool\": %s, \"after\": %s, \"bytes\": %d, \"ratio_to_restic\": %s}", first ? "" : ",", \
                jstr(x), jstr(afters[a]), S(x, afters[a]), jnum(ratio(S(x, afters[a]), S("restic", afters[a]))) > js
            first = 0
        }
    }
    printf "\n  ],\n  \"notes\": [" > js
    for (i = 1; i <= nn; i++) printf "%s%s", (i > 1) ? ", " : "", jstr(notes[i]) > js
    printf "]\n}\n" > js
}
