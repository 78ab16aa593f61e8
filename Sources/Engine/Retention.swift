import CairnCore
import Foundation

/// The `--keep-*` options of `cairn prune`: which snapshots of one group to keep.
///
/// The semantics follow restic's `forget` (see docs/RETENTION.md): `nil` means "option not
/// given"; a count of `-1` means unlimited; `0` and any other negative count keep nothing for
/// that rule. `keepWithin` is in seconds, measured back from the newest snapshot of the group.
package struct RetentionPolicy: Sendable, Equatable {
    package var keepLast: Int?
    package var keepHourly: Int?
    package var keepDaily: Int?
    package var keepWeekly: Int?
    package var keepMonthly: Int?
    package var keepYearly: Int?
    package var keepWithin: TimeInterval?

    package init(keepLast: Int? = nil, keepHourly: Int? = nil, keepDaily: Int? = nil, keepWeekly: Int? = nil,
                 keepMonthly: Int? = nil, keepYearly: Int? = nil, keepWithin: TimeInterval? = nil) {
        self.keepLast = keepLast
        self.keepHourly = keepHourly
        self.keepDaily = keepDaily
        self.keepWeekly = keepWeekly
        self.keepMonthly = keepMonthly
        self.keepYearly = keepYearly
        self.keepWithin = keepWithin
    }

    /// True when no option was given. An empty policy keeps every snapshot.
    package var isEmpty: Bool {
        keepLast == nil && keepHourly == nil && keepDaily == nil && keepWeekly == nil
            && keepMonthly == nil && keepYearly == nil && keepWithin == nil
    }
}

/// One snapshot as the retention policy sees it.
package struct RetentionCandidate: Sendable, Equatable {
    /// The snapshot id (hex).
    package var id: String
    package var time: Date
    /// A protected snapshot is always kept and takes no slot of any counted rule.
    package var protected: Bool

    package init(id: String, time: Date, protected: Bool) {
        self.id = id
        self.time = time
        self.protected = protected
    }
}

/// What the policy decided for one snapshot, and why.
package struct RetentionDecision: Sendable, Equatable {
    package var id: String
    package var keep: Bool
    /// Every rule that kept the snapshot, in the order last, hourly, daily, weekly, monthly,
    /// yearly, within, protected; e.g. `["last 1", "daily 2026-11-24", "within 7d"]`.
    /// Empty when the snapshot is removed.
    package var reasons: [String]

    package init(id: String, keep: Bool, reasons: [String]) {
        self.id = id
        self.keep = keep
        self.reasons = reasons
    }
}

package enum Retention {
    /// Decides for one group of snapshots (the CLI groups by VM and calls this per group).
    ///
    /// Returns one decision per candidate, newest first: ordered by time, then by id, both
    /// descending (of two snapshots with the same time, the greater id counts as newer).
    ///
    /// - Counted rules (last, hourly, daily, weekly, monthly, yearly) walk the snapshots from
    ///   newest to oldest, each on its own: a snapshot is kept when its bucket (UTC hour, UTC
    ///   day, ISO 8601 week in UTC, UTC month, UTC year; for `last`, every snapshot is its own
    ///   bucket) differs from the bucket of the snapshot this rule kept last, until the rule has
    ///   used its count of buckets. So each rule keeps the newest snapshot of each of its newest
    ///   N buckets.
    /// - `keepWithin` keeps every snapshot with `time >= reference - keepWithin`, where the
    ///   reference is the newest snapshot not later than `now` (restic's rule: the newest
    ///   snapshot, ignoring any dated in the future by a wrong clock); `now` itself when every
    ///   snapshot lies in the future. A negative or NaN `keepWithin` keeps nothing.
    /// - The rules are unioned. Protected snapshots are always kept and are invisible to the
    ///   counted rules; `keepWithin` still names them when they fall in its window.
    /// - An empty policy keeps everything (reason `"empty policy"`).
    package static func apply(_ policy: RetentionPolicy, to candidates: [RetentionCandidate], now: Date) -> [RetentionDecision] {
        let ordered = candidates.sorted { a, b in
            let ta = sortKey(a.time), tb = sortKey(b.time)
            return ta != tb ? ta > tb : a.id > b.id
        }
        if policy.isEmpty {
            return ordered.map {
                RetentionDecision(id: $0.id, keep: true, reasons: ["empty policy"] + ($0.protected ? ["protected"] : []))
            }
        }

        var rules: [CountedRule] = []
        if let n = policy.keepLast { rules.append(CountedRule(kind: .last, count: n)) }
        if let n = policy.keepHourly { rules.append(CountedRule(kind: .hourly, count: n)) }
        if let n = policy.keepDaily { rules.append(CountedRule(kind: .daily, count: n)) }
        if let n = policy.keepWeekly { rules.append(CountedRule(kind: .weekly, count: n)) }
        if let n = policy.keepMonthly { rules.append(CountedRule(kind: .monthly, count: n)) }
        if let n = policy.keepYearly { rules.append(CountedRule(kind: .yearly, count: n)) }

        var withinCutoff: Double?
        var withinReason = ""
        if let within = policy.keepWithin, within >= 0 {
            let nowKey = sortKey(now)
            let reference = ordered.first(where: { sortKey($0.time) <= nowKey }).map { sortKey($0.time) } ?? nowKey
            withinCutoff = reference - within
            withinReason = "within " + formatDuration(within)
        }

        var decisions: [RetentionDecision] = []
        decisions.reserveCapacity(ordered.count)
        for candidate in ordered {
            var reasons: [String] = []
            if !candidate.protected {
                let time = UTCTime(candidate.time)
                for i in rules.indices {
                    if let reason = rules[i].offer(time) { reasons.append(reason) }
                }
            }
            if let cutoff = withinCutoff, sortKey(candidate.time) >= cutoff {
                reasons.append(withinReason)
            }
            if candidate.protected { reasons.append("protected") }
            decisions.append(RetentionDecision(id: candidate.id, keep: !reasons.isEmpty, reasons: reasons))
        }
        return decisions
    }

    /// Parses a restic-style duration: one or more `<digits><unit>` terms, units `y` (365 days),
    /// `m` (30 days), `d` (24 hours) and `h` (hour), in any order, each unit at most once,
    /// e.g. `7d`, `12h`, `1y6m`, `2y5m7d3h`. Surrounding white space is ignored.
    /// Returns seconds. Throws `CairnError(.usage)` naming the bad text.
    package static func parseDuration(_ text: String) throws -> TimeInterval {
        func bad(_ why: String) -> CairnError {
            CairnError(.usage, "invalid duration \"\(text)\": \(why)",
                       hint: "write a number followed by y (365 days), m (30 days), d (days) or h (hours), e.g. 7d, 12h, 1y6m or 2y5m7d3h")
        }
        let body = text.trimmingCharacters(in: .whitespacesAndNewlines)
        if body.isEmpty { throw bad("it is empty") }

        var seen = Set<Character>()
        var total: Double = 0
        var digits = ""
        for ch in body {
            if ch.isASCII, ch.isNumber {
                digits.append(ch)
                continue
            }
            guard let unit = unitSeconds[ch] else {
                if digits.isEmpty { throw bad("expected a number, found \"\(ch)\"") }
                throw bad("unknown unit \"\(ch)\" after \(digits) (use y, m, d or h)")
            }
            if digits.isEmpty { throw bad("unit \"\(ch)\" has no number before it") }
            guard let value = Int(digits) else { throw bad("the number \(digits) is too large") }
            if !seen.insert(ch).inserted { throw bad("the unit \"\(ch)\" appears twice") }
            total += Double(value) * unit
            digits = ""
        }
        if !digits.isEmpty { throw bad("the number \(digits) has no unit (use y, m, d or h)") }
        return total
    }

    /// Formats seconds for a reason string: days, hours, minutes and seconds, zeros left out
    /// (`604800` → `"7d"`, `90000` → `"1d1h"`, `0` → `"0s"`). Never uses `m`, which in a
    /// duration means months.
    package static func formatDuration(_ seconds: TimeInterval) -> String {
        guard seconds.isFinite else { return seconds.isNaN ? "NaN" : "forever" }
        var rest = Int(max(min(seconds.rounded(.towardZero), 9e15), -9e15))
        var out = ""
        if rest < 0 { out = "-"; rest = -rest }
        let parts: [(Int, String)] = [(86_400, "d"), (3_600, "h"), (60, "min"), (1, "s")]
        var wrote = false
        for (size, unit) in parts where rest >= size {
            out += "\(rest / size)\(unit)"
            rest %= size
            wrote = true
        }
        return wrote ? out : out + "0s"
    }

    private static let unitSeconds: [Character: Double] = [
        "y": 365 * 86_400, "m": 30 * 86_400, "d": 86_400, "h": 3_600,
    ]

    /// Seconds since 1970 with NaN sorted as the oldest, so ordering is total.
    private static func sortKey(_ date: Date) -> Double {
        let t = date.timeIntervalSince1970
        return t.isNaN ? -.infinity : t
    }
}

// MARK: - Counted rules

private struct CountedRule {
    enum Kind { case last, hourly, daily, weekly, monthly, yearly }

    let kind: Kind
    /// Buckets still to fill; `nil` is unlimited (`-1`).
    var remaining: Int?
    var lastBucket: Int?
    var used = 0

    init(kind: Kind, count: Int) {
        self.kind = kind
        self.remaining = count == -1 ? nil : max(count, 0)
    }

    /// Offers the next older snapshot; returns the reason when this rule keeps it.
    mutating func offer(_ time: UTCTime) -> String? {
        if let remaining, remaining <= 0 { return nil }
        let bucket: Int
        switch kind {
        case .last: bucket = used   // every snapshot is a bucket of its own
        case .hourly: bucket = time.hourNumber
        case .daily: bucket = time.dayNumber
        case .weekly: bucket = time.isoWeek.year * 100 + time.isoWeek.week
        case .monthly: bucket = time.civil.year * 12 + time.civil.month
        case .yearly: bucket = time.civil.year
        }
        if bucket == lastBucket { return nil }
        lastBucket = bucket
        used += 1
        if let remaining { self.remaining = remaining - 1 }
        return reason(time)
    }

    private func reason(_ time: UTCTime) -> String {
        let c = time.civil
        switch kind {
        case .last: return "last \(used)"
        case .hourly: return "hourly \(pad(c.year, 4))-\(pad(c.month))-\(pad(c.day)) \(pad(time.hour)):00"
        case .daily: return "daily \(pad(c.year, 4))-\(pad(c.month))-\(pad(c.day))"
        case .weekly: return "weekly \(pad(time.isoWeek.year, 4))-W\(pad(time.isoWeek.week))"
        case .monthly: return "monthly \(pad(c.year, 4))-\(pad(c.month))"
        case .yearly: return "yearly \(pad(c.year, 4))"
        }
    }

    private func pad(_ n: Int, _ width: Int = 2) -> String {
        let s = String(abs(n))
        return (n < 0 ? "-" : "") + String(repeating: "0", count: max(0, width - s.count)) + s
    }
}

// MARK: - UTC calendar arithmetic

/// A point in time broken into UTC calendar fields with integer arithmetic on the proleptic
/// Gregorian calendar (no time zone database, no locale; same results as Foundation's
/// `Calendar(identifier: .iso8601)` in UTC, which the tests check).
private struct UTCTime {
    /// Whole hours and days since 1970-01-01T00:00Z (floored, so earlier times are negative).
    let hourNumber: Int
    let dayNumber: Int

    init(_ date: Date) {
        // Clamp to ±3 million years so a corrupt timestamp can never trap the integer conversion.
        let t = date.timeIntervalSince1970
        let seconds = t.isNaN ? -1e14 : min(max(t, -1e14), 1e14)
        hourNumber = Int((seconds / 3_600).rounded(.down))
        dayNumber = Int((seconds / 86_400).rounded(.down))
    }

    var hour: Int { hourNumber - dayNumber * 24 }

    var civil: (year: Int, month: Int, day: Int) { Timestamp.civil(fromDays: dayNumber) }

    /// ISO 8601 week: weeks start on Monday; week 1 is the week holding the year's first
    /// Thursday, so the week-year is the year of the week's Thursday.
    var isoWeek: (year: Int, week: Int) {
        let weekday = Self.floorMod(dayNumber + 3, 7)   // Monday = 0; 1970-01-01 was a Thursday
        let thursday = dayNumber - weekday + 3
        let year = Timestamp.civil(fromDays: thursday).year
        let week = (thursday - Timestamp.days(fromCivil: year, 1, 1)) / 7 + 1
        return (year, week)
    }

    private static func floorMod(_ a: Int, _ n: Int) -> Int { ((a % n) + n) % n }
}
