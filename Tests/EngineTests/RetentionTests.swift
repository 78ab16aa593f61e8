import CairnCore
import CairnTestSupport
@testable import Engine
import Foundation
import Testing

// MARK: - Helpers

private let hour: TimeInterval = 3_600
private let day: TimeInterval = 86_400

private let gregorianUTC: Calendar = {
    var c = Calendar(identifier: .gregorian)
    c.timeZone = TimeZone(identifier: "UTC")!
    return c
}()

private let isoUTC: Calendar = {
    var c = Calendar(identifier: .iso8601)
    c.timeZone = TimeZone(identifier: "UTC")!
    return c
}()

/// A UTC instant.
private func at(_ year: Int, _ month: Int, _ dayOfMonth: Int, _ hourOfDay: Int = 0, _ minute: Int = 0) -> Date {
    gregorianUTC.date(from: DateComponents(year: year, month: month, day: dayOfMonth, hour: hourOfDay, minute: minute))!
}

/// "2025-11-23T23:30", used as the snapshot id in the schedule tests so failures read well.
private func stamp(_ date: Date) -> String {
    let c = gregorianUTC.dateComponents([.year, .month, .day, .hour, .minute], from: date)
    return String(format: "%04d-%02d-%02dT%02d:%02d", c.year!, c.month!, c.day!, c.hour!, c.minute!)
}

private func candidates(_ times: [Date], protected: Set<String> = []) -> [RetentionCandidate] {
    times.map { RetentionCandidate(id: stamp($0), time: $0, protected: protected.contains(stamp($0))) }
}

/// Times from `start`, every `step` seconds, `count` of them.
private func schedule(from start: Date, every step: TimeInterval, count: Int) -> [Date] {
    (0..<count).map { start.addingTimeInterval(Double($0) * step) }
}

private func keptIDs(_ decisions: [RetentionDecision]) -> [String] {
    decisions.filter(\.keep).map(\.id)
}

private func reasons(_ decisions: [RetentionDecision]) -> [String: [String]] {
    Dictionary(uniqueKeysWithValues: decisions.map { ($0.id, $0.reasons) })
}

// MARK: - Reference implementation

/// A second, independent implementation of the documented rules, written differently on
/// purpose: Foundation's calendars instead of integer arithmetic, and "group into buckets,
/// take the newest N buckets, keep the newest snapshot of each" instead of a single walk.
private enum Reference {
    static func apply(_ policy: RetentionPolicy, to candidates: [RetentionCandidate], now: Date) -> [RetentionDecision] {
        let ordered = candidates.sorted { ($0.time, $0.id) > ($1.time, $1.id) }
        if policy.isEmpty {
            return ordered.map { RetentionDecision(id: $0.id, keep: true, reasons: ["empty policy"] + ($0.protected ? ["protected"] : [])) }
        }
        var why: [String: [String]] = [:]
        let open = ordered.filter { !$0.protected }

        if let n = policy.keepLast {
            let take = n == -1 ? open.count : max(0, min(n, open.count))
            for (i, c) in open.prefix(take).enumerated() { why[c.id, default: []].append("last \(i + 1)") }
        }
        let bucketRules: [(Int?, String, (Date) -> String)] = [
            (policy.keepHourly, "hourly", hourLabel),
            (policy.keepDaily, "daily", dayLabel),
            (policy.keepWeekly, "weekly", weekLabel),
            (policy.keepMonthly, "monthly", monthLabel),
            (policy.keepYearly, "yearly", yearLabel),
        ]
        for (count, name, label) in bucketRules {
            guard let count else { continue }
            let groups = Dictionary(grouping: open, by: { label($0.time) })
            let newestOfEach = groups.values.map { $0.max { ($0.time, $0.id) < ($1.time, $1.id) }! }
                .sorted { ($0.time, $0.id) > ($1.time, $1.id) }
            let take = count == -1 ? newestOfEach.count : max(0, min(count, newestOfEach.count))
            for c in newestOfEach.prefix(take) { why[c.id, default: []].append("\(name) \(label(c.time))") }
        }
        if let within = policy.keepWithin, within >= 0 {
            let reference = candidates.map(\.time).filter { $0 <= now }.max() ?? now
            for c in candidates where c.time >= reference.addingTimeInterval(-within) {
                why[c.id, default: []].append("within \(Retention.formatDuration(within))")
            }
        }
        for c in candidates where c.protected { why[c.id, default: []].append("protected") }
        return ordered.map { RetentionDecision(id: $0.id, keep: why[$0.id] != nil, reasons: why[$0.id] ?? []) }
    }

    static func hourLabel(_ d: Date) -> String {
        let c = gregorianUTC.dateComponents([.year, .month, .day, .hour], from: d)
        return String(format: "%04d-%02d-%02d %02d:00", c.year!, c.month!, c.day!, c.hour!)
    }
    static func dayLabel(_ d: Date) -> String {
        let c = gregorianUTC.dateComponents([.year, .month, .day], from: d)
        return String(format: "%04d-%02d-%02d", c.year!, c.month!, c.day!)
    }
    static func weekLabel(_ d: Date) -> String {
        let c = isoUTC.dateComponents([.yearForWeekOfYear, .weekOfYear], from: d)
        return String(format: "%04d-W%02d", c.yearForWeekOfYear!, c.weekOfYear!)
    }
    static func monthLabel(_ d: Date) -> String {
        let c = gregorianUTC.dateComponents([.year, .month], from: d)
        return String(format: "%04d-%02d", c.year!, c.month!)
    }
    static func yearLabel(_ d: Date) -> String {
        String(format: "%04d", gregorianUTC.component(.year, from: d))
    }
}

// MARK: - Tests

@Suite("Retention policy")
struct RetentionTests {
    @Test("400 days of hourly snapshots: keep-daily 7, weekly 4, monthly 12, yearly 2")
    func hourlyOver400Days() {
        // 2024-10-20T00:30Z … 2025-11-23T23:30Z (a Sunday, ISO week 2025-W47), 9600 snapshots.
        let times = schedule(from: at(2024, 10, 20, 0, 30), every: hour, count: 400 * 24)
        #expect(stamp(times.last!) == "2025-11-23T23:30")
        let all = candidates(times)
        let policy = RetentionPolicy(keepDaily: 7, keepWeekly: 4, keepMonthly: 12, keepYearly: 2)
        let decisions = Retention.apply(policy, to: all, now: times.last!.addingTimeInterval(600))

        // Worked out by hand: the 23:30 snapshot is the newest of its hour, day, week, month
        // and year whenever that period ends inside the schedule.
        let expected: [(String, [String])] = [
            ("2025-11-23T23:30", ["daily 2025-11-23", "weekly 2025-W47", "monthly 2025-11", "yearly 2025"]),
            ("2025-11-22T23:30", ["daily 2025-11-22"]),
            ("2025-11-21T23:30", ["daily 2025-11-21"]),
            ("2025-11-20T23:30", ["daily 2025-11-20"]),
            ("2025-11-19T23:30", ["daily 2025-11-19"]),
            ("2025-11-18T23:30", ["daily 2025-11-18"]),
            ("2025-11-17T23:30", ["daily 2025-11-17"]),
            ("2025-11-16T23:30", ["weekly 2025-W46"]),
            ("2025-11-09T23:30", ["weekly 2025-W45"]),
            ("2025-11-02T23:30", ["weekly 2025-W44"]),
            ("2025-10-31T23:30", ["monthly 2025-10"]),
            ("2025-09-30T23:30", ["monthly 2025-09"]),
            ("2025-08-31T23:30", ["monthly 2025-08"]),
            ("2025-07-31T23:30", ["monthly 2025-07"]),
            ("2025-06-30T23:30", ["monthly 2025-06"]),
            ("2025-05-31T23:30", ["monthly 2025-05"]),
            ("2025-04-30T23:30", ["monthly 2025-04"]),
            ("2025-03-31T23:30", ["monthly 2025-03"]),
            ("2025-02-28T23:30", ["monthly 2025-02"]),
            ("2025-01-31T23:30", ["monthly 2025-01"]),
            ("2024-12-31T23:30", ["monthly 2024-12", "yearly 2024"]),
        ]
        #expect(keptIDs(decisions) == expected.map(\.0))
        let got = reasons(decisions)
        for (id, why) in expected { #expect(got[id] == why, "reasons for \(id)") }

        #expect(decisions.count == all.count)
        #expect(decisions.map(\.id) == all.map(\.id).reversed(), "newest first")
        #expect(decisions.filter { !$0.keep }.allSatisfy { $0.reasons.isEmpty })
        #expect(decisions == Reference.apply(policy, to: all, now: times.last!.addingTimeInterval(600)))

        // Only two calendar years exist: asking for five keeps the same two (no "keep the
        // oldest as well" rule, unlike restic 0.17+).
        let moreYears = Retention.apply(RetentionPolicy(keepYearly: 5), to: all, now: times.last!)
        #expect(keptIDs(moreYears) == ["2025-11-23T23:30", "2024-12-31T23:30"])
    }

    @Test("the worked example in docs/RETENTION.md")
    func documentedExample() throws {
        let snapshots: [(String, Date)] = [
            ("a1", at(2026, 11, 24, 22)), ("b2", at(2026, 11, 24, 10)), ("c3", at(2026, 11, 23, 22)),
            ("d4", at(2026, 11, 22, 22)), ("e5", at(2026, 11, 21, 22)), ("f6", at(2026, 11, 15, 22)),
            ("g7", at(2026, 11, 8, 22)), ("h8", at(2026, 10, 31, 22)), ("i9", at(2026, 10, 25, 22)),
            ("j0", at(2026, 9, 30, 22)), ("k1", at(2025, 12, 31, 22)),
        ]
        let all = snapshots.reversed().map { RetentionCandidate(id: $0.0, time: $0.1, protected: $0.0 == "d4") }
        let now = at(2026, 11, 25, 3)
        func run(_ policy: RetentionPolicy) -> [String: [String]] {
            let decisions = Retention.apply(policy, to: all, now: now)
            #expect(decisions.map(\.id) == snapshots.map(\.0))
            #expect(decisions == Reference.apply(policy, to: all, now: now))
            return reasons(decisions)
        }
        let p: [String] = ["protected"]
        let threeDays = try Retention.parseDuration("3d")

        #expect(run(RetentionPolicy(keepLast: 3)) == [
            "a1": ["last 1"], "b2": ["last 2"], "c3": ["last 3"], "d4": p, "e5": [], "f6": [], "g7": [],
            "h8": [], "i9": [], "j0": [], "k1": [],
        ])
        #expect(run(RetentionPolicy(keepDaily: 3)) == [
            "a1": ["daily 2026-11-24"], "b2": [], "c3": ["daily 2026-11-23"], "d4": p, "e5": ["daily 2026-11-21"],
            "f6": [], "g7": [], "h8": [], "i9": [], "j0": [], "k1": [],
        ])
        #expect(run(RetentionPolicy(keepWeekly: 3)) == [
            "a1": ["weekly 2026-W48"], "b2": [], "c3": [], "d4": p, "e5": ["weekly 2026-W47"],
            "f6": ["weekly 2026-W46"], "g7": [], "h8": [], "i9": [], "j0": [], "k1": [],
        ])
        #expect(run(RetentionPolicy(keepMonthly: 3, keepYearly: 2)) == [
            "a1": ["monthly 2026-11", "yearly 2026"], "b2": [], "c3": [], "d4": p, "e5": [], "f6": [], "g7": [],
            "h8": ["monthly 2026-10"], "i9": [], "j0": ["monthly 2026-09"], "k1": ["yearly 2025"],
        ])
        #expect(run(RetentionPolicy(keepWithin: threeDays)) == [
            "a1": ["within 3d"], "b2": ["within 3d"], "c3": ["within 3d"], "d4": ["within 3d", "protected"],
            "e5": ["within 3d"], "f6": [], "g7": [], "h8": [], "i9": [], "j0": [], "k1": [],
        ])
        #expect(run(RetentionPolicy(keepLast: 1, keepDaily: 3, keepWeekly: 2, keepMonthly: 3, keepYearly: 2)) == [
            "a1": ["last 1", "daily 2026-11-24", "weekly 2026-W48", "monthly 2026-11", "yearly 2026"],
            "b2": [], "c3": ["daily 2026-11-23"], "d4": p, "e5": ["daily 2026-11-21", "weekly 2026-W47"],
            "f6": [], "g7": [], "h8": ["monthly 2026-10"], "i9": [], "j0": ["monthly 2026-09"], "k1": ["yearly 2025"],
        ])
    }

    @Test("keep-hourly on the same schedule keeps the newest N hours")
    func hourly() {
        let times = schedule(from: at(2024, 10, 20, 0, 30), every: hour, count: 400 * 24)
        let decisions = Retention.apply(RetentionPolicy(keepHourly: 3), to: candidates(times), now: times.last!)
        #expect(keptIDs(decisions) == ["2025-11-23T23:30", "2025-11-23T22:30", "2025-11-23T21:30"])
        #expect(decisions.first?.reasons == ["hourly 2025-11-23 23:00"])
    }

    @Test("keep-last and keep-daily overlap: the union is kept, each snapshot names every rule")
    func lastAndDailyOverlap() {
        // Every 6 hours for three days: 00:00, 06:00, 12:00, 18:00.
        let times = schedule(from: at(2026, 3, 1), every: 6 * hour, count: 12)
        let decisions = Retention.apply(RetentionPolicy(keepLast: 3, keepDaily: 2), to: candidates(times), now: times.last!)
        #expect(keptIDs(decisions) == ["2026-03-03T18:00", "2026-03-03T12:00", "2026-03-03T06:00", "2026-03-02T18:00"])
        let why = reasons(decisions)
        #expect(why["2026-03-03T18:00"] == ["last 1", "daily 2026-03-03"])
        #expect(why["2026-03-03T12:00"] == ["last 2"])
        #expect(why["2026-03-03T06:00"] == ["last 3"])
        #expect(why["2026-03-02T18:00"] == ["daily 2026-03-02"])
        #expect(why["2026-03-02T12:00"] == [])
    }

    @Test("protected snapshots are kept and take no slot of keep-last")
    func protectedTakesNoLastSlot() {
        let times = schedule(from: at(2026, 1, 1, 2), every: day, count: 10)   // Jan 1 … Jan 10
        let all = candidates(times, protected: ["2026-01-10T02:00", "2026-01-09T02:00", "2026-01-02T02:00"])
        let decisions = Retention.apply(RetentionPolicy(keepLast: 2), to: all, now: times.last!)
        #expect(keptIDs(decisions) == ["2026-01-10T02:00", "2026-01-09T02:00", "2026-01-08T02:00",
                                       "2026-01-07T02:00", "2026-01-02T02:00"])
        let why = reasons(decisions)
        #expect(why["2026-01-10T02:00"] == ["protected"])
        #expect(why["2026-01-08T02:00"] == ["last 1"])
        #expect(why["2026-01-07T02:00"] == ["last 2"])
        #expect(why["2026-01-02T02:00"] == ["protected"])
        #expect(decisions == Reference.apply(RetentionPolicy(keepLast: 2), to: all, now: times.last!))
    }

    @Test("a protected snapshot does not fill its day's bucket: the next one in that day does")
    func protectedTakesNoDailySlot() {
        let times = [at(2026, 5, 1, 12), at(2026, 5, 1, 23), at(2026, 4, 30, 23), at(2026, 4, 29, 23)]
        let all = candidates(times, protected: ["2026-05-01T23:00"])
        let decisions = Retention.apply(RetentionPolicy(keepDaily: 2), to: all, now: at(2026, 5, 2))
        #expect(keptIDs(decisions) == ["2026-05-01T23:00", "2026-05-01T12:00", "2026-04-30T23:00"])
        let why = reasons(decisions)
        #expect(why["2026-05-01T23:00"] == ["protected"])
        #expect(why["2026-05-01T12:00"] == ["daily 2026-05-01"])
        #expect(why["2026-04-30T23:00"] == ["daily 2026-04-30"])
        #expect(why["2026-04-29T23:00"] == [])
    }

    @Test("keep-within counts back from the newest snapshot, not from now, and is inclusive")
    func within() {
        // Every 12 hours for 30 days; the newest is 2026-06-30T12:00.
        let times = schedule(from: at(2026, 6, 1), every: 12 * hour, count: 60)
        let newest = times.last!
        #expect(stamp(newest) == "2026-06-30T12:00")
        let policy = RetentionPolicy(keepWithin: 7 * day)
        // A year after the last backup: measuring from now would keep nothing.
        let decisions = Retention.apply(policy, to: candidates(times), now: newest.addingTimeInterval(365 * day))
        let kept = keptIDs(decisions)
        #expect(kept.count == 15, "T, T-12h, …, T-7d")
        #expect(kept.first == "2026-06-30T12:00")
        #expect(kept.last == "2026-06-23T12:00", "exactly 7 days before the newest is kept")
        #expect(!kept.contains("2026-06-23T00:00"))
        #expect(decisions.first?.reasons == ["within 7d"])

        let zero = Retention.apply(RetentionPolicy(keepWithin: 0), to: candidates(times), now: newest)
        #expect(keptIDs(zero) == ["2026-06-30T12:00"], "within 0 keeps the newest only")
    }

    @Test("keep-within ignores snapshots dated in the future when it picks the newest")
    func withinFutureSnapshot() {
        let times = schedule(from: at(2026, 6, 1), every: 12 * hour, count: 10)   // … 2026-06-05T12:00
        let skewed = at(2026, 7, 5)                                                // a wrong clock
        let now = at(2026, 6, 5, 13)
        let decisions = Retention.apply(RetentionPolicy(keepWithin: day), to: candidates(times + [skewed]), now: now)
        #expect(keptIDs(decisions) == ["2026-07-05T00:00", "2026-06-05T12:00", "2026-06-05T00:00", "2026-06-04T12:00"])

        // Every snapshot in the future: the window ends at now, so all of them are kept.
        let early = Retention.apply(RetentionPolicy(keepWithin: day), to: candidates(times), now: at(2020, 1, 1))
        #expect(early.filter { !$0.keep }.isEmpty)
    }

    @Test("keep-within names protected snapshots inside the window as well")
    func withinAndProtected() {
        let times = [at(2026, 6, 10), at(2026, 6, 9), at(2026, 1, 1)]
        let all = candidates(times, protected: ["2026-06-10T00:00", "2026-01-01T00:00"])
        let decisions = Retention.apply(RetentionPolicy(keepLast: 1, keepWithin: 7 * day), to: all, now: at(2026, 6, 10))
        let why = reasons(decisions)
        #expect(why["2026-06-10T00:00"] == ["within 7d", "protected"])
        #expect(why["2026-06-09T00:00"] == ["last 1", "within 7d"])
        #expect(why["2026-01-01T00:00"] == ["protected"])
    }

    @Test("ISO weeks cross the year end: 2020-12-31 and 2021-01-01 are both in 2020-W53")
    func isoWeekAcrossYearEnd() {
        let times = [
            at(2021, 1, 4, 0, 0),    // Monday, 2021-W01
            at(2021, 1, 3, 23, 59),  // Sunday, still 2020-W53
            at(2021, 1, 1, 10),      // Friday, 2020-W53
            at(2020, 12, 31, 10),    // Thursday, 2020-W53
            at(2020, 12, 27, 10),    // Sunday, 2020-W52
        ]
        let all = candidates(times)
        let weekly = Retention.apply(RetentionPolicy(keepWeekly: 3), to: all, now: at(2021, 1, 5))
        #expect(keptIDs(weekly) == ["2021-01-04T00:00", "2021-01-03T23:59", "2020-12-27T10:00"])
        let why = reasons(weekly)
        #expect(why["2021-01-04T00:00"] == ["weekly 2021-W01"])
        #expect(why["2021-01-03T23:59"] == ["weekly 2020-W53"])
        #expect(why["2020-12-27T10:00"] == ["weekly 2020-W52"])

        // Without the Sunday and Monday, Thursday and Friday share one week: only Friday stays.
        let thuFri = candidates([at(2021, 1, 1, 10), at(2020, 12, 31, 10)])
        #expect(keptIDs(Retention.apply(RetentionPolicy(keepWeekly: 1), to: thuFri, now: at(2021, 1, 2))) == ["2021-01-01T10:00"])
        #expect(keptIDs(Retention.apply(RetentionPolicy(keepWeekly: 2), to: thuFri, now: at(2021, 1, 2))) == ["2021-01-01T10:00"])
        // … but they are in different years.
        #expect(keptIDs(Retention.apply(RetentionPolicy(keepYearly: 2), to: thuFri, now: at(2021, 1, 2)))
                == ["2021-01-01T10:00", "2020-12-31T10:00"])
    }

    @Test("buckets are UTC: one second before midnight UTC is the previous day")
    func utcDayBoundary() {
        let midnight = at(2026, 3, 29)
        let all = [
            RetentionCandidate(id: "after", time: midnight, protected: false),
            RetentionCandidate(id: "before", time: midnight.addingTimeInterval(-1), protected: false),
            RetentionCandidate(id: "earlier", time: midnight.addingTimeInterval(-3_600), protected: false),
        ]
        let decisions = Retention.apply(RetentionPolicy(keepDaily: 5), to: all, now: midnight)
        #expect(keptIDs(decisions) == ["after", "before"])
        #expect(reasons(decisions)["before"] == ["daily 2026-03-28"])
    }

    @Test("the UTC calendar arithmetic matches Foundation's across fifty year ends")
    func calendarMatchesFoundation() {
        var times: [Date] = []
        for year in 1995...2045 {
            for offset in stride(from: -10.0, through: 10.0, by: 1) {
                times.append(at(year, 1, 1, 7).addingTimeInterval(offset * day))
                times.append(at(year, 1, 1, 23, 59).addingTimeInterval(offset * day))
            }
            times.append(at(year, 2, 28, 12))
            times.append(at(year, 2, 28, 12).addingTimeInterval(day))   // Feb 29 or Mar 1
        }
        let all = times.enumerated().map { RetentionCandidate(id: String(format: "%05d", $0.offset), time: $0.element, protected: false) }
        let policy = RetentionPolicy(keepHourly: -1, keepDaily: -1, keepWeekly: -1, keepMonthly: -1, keepYearly: -1)
        let now = at(2050, 1, 1)
        #expect(Retention.apply(policy, to: all, now: now) == Reference.apply(policy, to: all, now: now))
    }

    @Test("-1 is unlimited; 0 and other negative counts keep nothing for that rule")
    func unlimitedAndZero() {
        let times = schedule(from: at(2026, 2, 1), every: 6 * hour, count: 40)   // ten days
        let all = candidates(times)
        let now = times.last!

        let daily = Retention.apply(RetentionPolicy(keepDaily: -1), to: all, now: now)
        #expect(keptIDs(daily) == (1...10).reversed().map { String(format: "2026-02-%02dT18:00", $0) })

        let last = Retention.apply(RetentionPolicy(keepLast: -1), to: all, now: now)
        #expect(last.filter { !$0.keep }.isEmpty)
        #expect(last.last?.reasons == ["last 40"])

        for n in [0, -2, -100] {
            let none = Retention.apply(RetentionPolicy(keepDaily: n), to: all, now: now)
            #expect(keptIDs(none).isEmpty, "keep-daily \(n)")
        }
        #expect(!RetentionPolicy(keepLast: 0).isEmpty)
        #expect(keptIDs(Retention.apply(RetentionPolicy(keepLast: 0, keepMonthly: 1), to: all, now: now)) == ["2026-02-10T18:00"])
        #expect(keptIDs(Retention.apply(RetentionPolicy(keepWithin: -day), to: all, now: now)).isEmpty)
    }

    @Test("equal times are ordered by id: the greater id counts as newer, whatever the input order")
    func ties() {
        let t = at(2026, 8, 1, 12)
        let base = [
            RetentionCandidate(id: "aa", time: t, protected: false),
            RetentionCandidate(id: "bb", time: t, protected: false),
            RetentionCandidate(id: "cc", time: t.addingTimeInterval(-hour), protected: false),
        ]
        for permutation in [[0, 1, 2], [1, 0, 2], [2, 1, 0], [2, 0, 1]] {
            let input = permutation.map { base[$0] }
            let last = Retention.apply(RetentionPolicy(keepLast: 1), to: input, now: t)
            #expect(last.map(\.id) == ["bb", "aa", "cc"])
            #expect(keptIDs(last) == ["bb"])
            #expect(keptIDs(Retention.apply(RetentionPolicy(keepDaily: 1), to: input, now: t)) == ["bb"])
            #expect(keptIDs(Retention.apply(RetentionPolicy(keepWithin: 0), to: input, now: t)) == ["bb", "aa"])
        }
    }

    @Test("an empty policy keeps everything; no candidates give no decisions")
    func emptyPolicy() {
        let all = candidates([at(2026, 1, 2), at(2026, 1, 1)], protected: ["2026-01-01T00:00"])
        #expect(RetentionPolicy().isEmpty)
        let decisions = Retention.apply(RetentionPolicy(), to: all, now: at(2026, 1, 3))
        #expect(decisions == [
            RetentionDecision(id: "2026-01-02T00:00", keep: true, reasons: ["empty policy"]),
            RetentionDecision(id: "2026-01-01T00:00", keep: true, reasons: ["empty policy", "protected"]),
        ])
        #expect(Retention.apply(RetentionPolicy(keepLast: 3), to: [], now: at(2026, 1, 3)).isEmpty)
    }

    @Test("random irregular schedules and policies agree with the reference implementation", arguments: 0..<8)
    func agreesWithReference(seed: UInt64) {
        var rng = SeededRandom(seed: 0xC0FFEE + seed)
        for _ in 0..<25 {
            // Irregular gaps from 0 (a tie) to four days, starting anywhere in 1990…2100.
            var t = Double(Int.random(in: 631_152_000...4_102_444_800, using: &rng))
            var all: [RetentionCandidate] = []
            for i in 0..<Int.random(in: 1...250, using: &rng) {
                let gapKind = Int.random(in: 0..<10, using: &rng)
                t += gapKind == 0 ? 0 : Double(Int.random(in: 60...(gapKind < 7 ? 6 * 3_600 : 4 * 86_400), using: &rng))
                all.append(RetentionCandidate(id: String(format: "%016llx", rng.next()) + "-\(i)",
                                              time: Date(timeIntervalSince1970: t),
                                              protected: Int.random(in: 0..<10, using: &rng) == 0))
            }
            all.shuffle(using: &rng)
            func count() -> Int? {
                switch Int.random(in: 0..<6, using: &rng) {
                case 0, 1: nil
                case 2: -1
                case 3: 0
                default: Int.random(in: 1...12, using: &rng)
                }
            }
            let policy = RetentionPolicy(
                keepLast: count(), keepHourly: count(), keepDaily: count(), keepWeekly: count(),
                keepMonthly: count(), keepYearly: count(),
                keepWithin: Bool.random(using: &rng) ? nil : Double(Int.random(in: 0...2_000, using: &rng)) * 3_600)
            let newest = all.map(\.time).max()!
            let now = newest.addingTimeInterval(Double(Int.random(in: -5...5, using: &rng)) * 86_400)
            let got = Retention.apply(policy, to: all, now: now)
            let want = Reference.apply(policy, to: all, now: now)
            if got != want {
                // Name the first difference rather than dumping hundreds of decisions.
                let pairs = Array(zip(got, want))
                let i = pairs.firstIndex { $0.0 != $0.1 } ?? pairs.count
                let detail = i < pairs.count ? "got \(pairs[i].0), want \(pairs[i].1)" : "got \(got.count) decisions, want \(want.count)"
                Issue.record("seed \(seed), policy \(policy), now \(now): decision \(i) differs: \(detail)")
                return
            }
        }
    }

    // MARK: Durations

    static let goodDurations: [(String, TimeInterval)] = [
        ("7d", 7 * day),
        ("12h", 12 * hour),
        ("1y", 365 * day),
        ("1m", 30 * day),
        ("1y2m3d4h", (365 + 60 + 3) * day + 4 * hour),
        ("2y5m7d3h", (730 + 150 + 7) * day + 3 * hour),
        ("3h2y", 730 * day + 3 * hour),
        ("0d", 0),
        ("007d", 7 * day),
        (" 7d\n", 7 * day),
        ("36h", 36 * hour),
    ]

    static let badDurations: [String] = [
        "", "   ", "7", "d", "7x", "1.5d", "-1d", "+1d", "7d7d", "7dd", "7D", "1w", "7 d", "30s",
        "99999999999999999999999d", "1y 2m", "\u{0663}d",
    ]

    @Test("durations in restic's syntax", arguments: goodDurations)
    func parseGood(text: String, seconds: TimeInterval) throws {
        #expect(try Retention.parseDuration(text) == seconds)
    }

    @Test("bad durations are usage errors that quote the text", arguments: badDurations)
    func parseBad(text: String) {
        let error = #expect(throws: CairnError.self) { try Retention.parseDuration(text) }
        #expect(error?.code == .usage)
        #expect(error?.message.contains("\"\(text)\"") == true, "message: \(error?.message ?? "")")
        #expect(error?.hint != nil)
    }

    @Test("durations format without the ambiguous m")
    func formatDuration() {
        #expect(Retention.formatDuration(7 * day) == "7d")
        #expect(Retention.formatDuration(day + hour) == "1d1h")
        #expect(Retention.formatDuration(365 * day) == "365d")
        #expect(Retention.formatDuration(90) == "1min30s")
        #expect(Retention.formatDuration(0) == "0s")
        #expect(Retention.formatDuration(.infinity) == "forever")
    }
}
