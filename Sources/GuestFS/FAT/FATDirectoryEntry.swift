import CairnCore

/// Name handling: 8.3 names (code page 437, as Linux mounts by default), the long-name
/// checksum, and UTF-16 long names.
enum FATName {
    /// Code page 437, bytes 0x80-0xFF.
    static let cp437High: [UInt16] = [
        0x00C7, 0x00FC, 0x00E9, 0x00E2, 0x00E4, 0x00E0, 0x00E5, 0x00E7, 0x00EA, 0x00EB, 0x00E8, 0x00EF, 0x00EE, 0x00EC, 0x00C4, 0x00C5,
        0x00C9, 0x00E6, 0x00C6, 0x00F4, 0x00F6, 0x00F2, 0x00FB, 0x00F9, 0x00FF, 0x00D6, 0x00DC, 0x00A2, 0x00A3, 0x00A5, 0x20A7, 0x0192,
        0x00E1, 0x00ED, 0x00F3, 0x00FA, 0x00F1, 0x00D1, 0x00AA, 0x00BA, 0x00BF, 0x2310, 0x00AC, 0x00BD, 0x00BC, 0x00A1, 0x00AB, 0x00BB,
        0x2591, 0x2592, 0x2593, 0x2502, 0x2524, 0x2561, 0x2562, 0x2556, 0x2555, 0x2563, 0x2551, 0x2557, 0x255D, 0x255C, 0x255B, 0x2510,
        0x2514, 0x2534, 0x252C, 0x251C, 0x2500, 0x253C, 0x255E, 0x255F, 0x255A, 0x2554, 0x2569, 0x2566, 0x2560, 0x2550, 0x256C, 0x2567,
        0x2568, 0x2564, 0x2565, 0x2559, 0x2558, 0x2552, 0x2553, 0x256B, 0x256A, 0x2518, 0x250C, 0x2588, 0x2584, 0x258C, 0x2590, 0x2580,
        0x03B1, 0x00DF, 0x0393, 0x03C0, 0x03A3, 0x03C3, 0x00B5, 0x03C4, 0x03A6, 0x0398, 0x03A9, 0x03B4, 0x221E, 0x03C6, 0x03B5, 0x2229,
        0x2261, 0x00B1, 0x2265, 0x2264, 0x2320, 0x2321, 0x00F7, 0x2248, 0x00B0, 0x2219, 0x00B7, 0x221A, 0x207F, 0x00B2, 0x25A0, 0x00A0,
    ]

    /// Bytes in code page 437 (ASCII below 0x80).
    static func decode8Bit(_ bytes: some Collection<UInt8>) -> String {
        var s = String.UnicodeScalarView()
        for b in bytes {
            let v = b < 0x80 ? UInt16(b) : cp437High[Int(b & 0x7F)]
            if let u = Unicode.Scalar(v) { s.append(u) }
        }
        return String(s)
    }

    static func trimTrailingSpaces(_ text: String) -> String {
        var s = Substring(text)
        while s.last == " " { s = s.dropLast() }
        return String(s)
    }

    /// The checksum of an 11-byte short name that every long-name entry of its set carries:
    /// rotate right by one bit, add the next byte (8-bit arithmetic).
    static func checksum(_ shortName: some Collection<UInt8>) -> UInt8 {
        var sum: UInt8 = 0
        for b in shortName { sum = ((sum & 1) << 7) &+ (sum >> 1) &+ b }
        return sum
    }

    /// The text form of the 11-byte short name: base and extension without padding, joined
    /// by "."; 0x05 in the first byte stands for 0xE5; the NT flags (byte 12 of the entry)
    /// 0x08 and 0x10 lowercase the base and the extension. Nil for names no reader can use
    /// (control characters, "/", a blank base).
    static func shortName(_ raw: [UInt8], caseFlags: UInt8) -> String? {
        guard raw.count == 11 else { return nil }
        var bytes = raw
        if bytes[0] == 0x05 { bytes[0] = 0xE5 }
        guard bytes[0] != 0x20, !bytes.contains(where: { $0 < 0x20 || $0 == 0x2F }) else { return nil }
        var base = trimTrailingSpaces(decode8Bit(bytes[0..<8]))
        var ext = trimTrailingSpaces(decode8Bit(bytes[8..<11]))
        if caseFlags & 0x08 != 0 { base = base.lowercased() }
        if caseFlags & 0x10 != 0 { ext = ext.lowercased() }
        return ext.isEmpty ? base : base + "." + ext
    }

    /// A long name from its UTF-16 units (terminated by 0x0000 or the end; 0xFFFF pads).
    /// Nil for unpaired surrogates, an empty name, "." / "..", or a name with "/" or NUL.
    static func longName(_ units: [UInt16]) -> String? {
        var used = units
        if let end = used.firstIndex(of: 0) { used.removeSubrange(end...) }
        var out = String.UnicodeScalarView()
        var it = used.makeIterator()
        var decoder = UTF16()
        loop: while true {
            switch decoder.decode(&it) {
            case .scalarValue(let u): out.append(u)
            case .emptyInput: break loop
            case .error: return nil
            }
        }
        let name = String(out)
        guard !name.isEmpty, name != ".", name != "..", !name.contains("/") else { return nil }
        return name
    }
}

/// A 32-byte short directory entry (all fields little-endian):
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 11 | name (8 + 3, space padded; byte 0: 0x00 end, 0xE5 deleted, 0x05 = 0xE5) |
/// | 11 | 1 | attributes: 0x01 read-only, 0x02 hidden, 0x04 system, 0x08 volume label, 0x10 directory, 0x20 archive; 0x0F = long-name entry |
/// | 12 | 1 | NT case flags: 0x08 base lowercase, 0x10 extension lowercase |
/// | 13 | 1 | creation time, 10 ms units (0-199) |
/// | 14 | 2 | creation time (2 s resolution) |
/// | 16 | 2 | creation date |
/// | 18 | 2 | access date |
/// | 20 | 2 | first cluster, high 16 bits (FAT32) |
/// | 22 | 2 | modification time |
/// | 24 | 2 | modification date |
/// | 26 | 2 | first cluster, low 16 bits |
/// | 28 | 4 | file size in bytes |
struct FATDirectoryEntry: Sendable, Equatable {
    var rawName: [UInt8]
    var attributes: UInt8
    var caseFlags: UInt8
    var createTenMs: UInt8
    var createTime: UInt16
    var createDate: UInt16
    var accessDate: UInt16
    var writeTime: UInt16
    var writeDate: UInt16
    var firstCluster: UInt32
    var size: UInt32

    static let readOnly: UInt8 = 0x01
    static let volumeLabel: UInt8 = 0x08
    static let directoryFlag: UInt8 = 0x10
    static let longNameMask: UInt8 = 0x3F
    static let longName: UInt8 = 0x0F

    init?(_ b: [UInt8], at o: Int) {
        let c = CheckedBytes(b)
        guard let name = c.slice(at: o, count: 11), let attr = c.u8(at: o + 11), let nt = c.u8(at: o + 12),
              let tenMs = c.u8(at: o + 13), let ct = c.u16(at: o + 14), let cd = c.u16(at: o + 16), let ad = c.u16(at: o + 18),
              let hi = c.u16(at: o + 20), let wt = c.u16(at: o + 22), let wd = c.u16(at: o + 24), let lo = c.u16(at: o + 26),
              let size = c.u32(at: o + 28)
        else { return nil }
        rawName = Array(name)
        attributes = attr
        caseFlags = nt
        createTenMs = tenMs
        createTime = ct
        createDate = cd
        accessDate = ad
        writeTime = wt
        writeDate = wd
        firstCluster = UInt32(hi) << 16 | UInt32(lo)
        self.size = size
    }

    var isDirectory: Bool { attributes & Self.directoryFlag != 0 }
    var isVolumeLabel: Bool { attributes & Self.volumeLabel != 0 }
    var isLongNamePart: Bool { attributes & Self.longNameMask == Self.longName }
    var isDotEntry: Bool { rawName[0] == 0x2E && (rawName[1] == 0x20 || (rawName[1] == 0x2E && rawName[2] == 0x20)) }

    /// POSIX permissions as Linux's vfat shows them by default: directories 0o755, files
    /// 0o644, read-only files without write bits (the attribute is ignored on directories).
    var permissions: UInt32 {
        if isDirectory { return 0o755 }
        return attributes & Self.readOnly != 0 ? 0o444 : 0o644
    }

    var modified: FileTime { FATTime.time(date: writeDate, time: writeTime) ?? FATTime.fatEpoch }
    var accessed: FileTime { FATTime.time(date: accessDate, time: 0) ?? modified }
    var created: FileTime? {
        guard var t = FATTime.time(date: createDate, time: createTime) else { return nil }
        if createTenMs < 200 {
            t.seconds += Int64(createTenMs / 100)
            t.nanoseconds = UInt32(createTenMs % 100) * 10_000_000
        }
        return t
    }
}

/// FAT dates and times: date = day (bits 0-4) | month (5-8) | years since 1980 (9-15);
/// time = seconds / 2 (bits 0-4) | minutes (5-10) | hours (11-15). They are local time of
/// whoever wrote them; this reader takes them as UTC.
enum FATTime {
    /// 1980-01-01 00:00:00 UTC.
    static let fatEpoch = FileTime(seconds: 315_532_800)

    /// Nil for a zero date (never set). Out-of-range fields are clamped.
    static func time(date: UInt16, time: UInt16) -> FileTime? {
        guard date != 0 else { return nil }
        let day = max(1, Int64(date & 0x1F))
        let month = min(12, max(1, Int64((date >> 5) & 0x0F)))
        let year = 1980 + Int64(date >> 9)
        let seconds = min(59, Int64(time & 0x1F) * 2)
        let minutes = min(59, Int64((time >> 5) & 0x3F))
        let hours = min(23, Int64(time >> 11))
        let days = daysFromCivil(year: year, month: month, day: day)
        return FileTime(seconds: days * 86400 + hours * 3600 + minutes * 60 + seconds)
    }

    /// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
    static func daysFromCivil(year: Int64, month: Int64, day: Int64) -> Int64 {
        let y = month <= 2 ? year - 1 : year
        let era = (y >= 0 ? y : y - 399) / 400
        let yoe = y - era * 400
        let mp = (month + 9) % 12
        let doy = (153 * mp + 2) / 5 + day - 1
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy
        return era * 146_097 + doe - 719_468
    }
}
