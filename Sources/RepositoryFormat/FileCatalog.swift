import CairnCore

/// The file catalog of one snapshot disk (docs/FORMAT.md, "File catalog"): every file of every
/// recognised guest file system with its metadata, made during backup so that `cairn find`
/// answers from catalogs instead of walking images. UTF-8 text, one record per line, fields
/// separated by TAB:
///
///     cairn-catalog 1
///     V <volume> <type> <label> <uuid>
///     F <volume#> <kind> <permissions, octal> <uid> <gid> <size> <mtime s> <mtime ns> <path>
///
/// `volume#` counts V lines from 0; `kind` is the `ls -l` type letter; `path` is absolute
/// inside its volume. Text fields escape backslash, TAB, LF and CR as `\\`, `\t`, `\n`, `\r`.
package struct FileCatalog: Sendable, Equatable {
    package struct VolumeInfo: Sendable, Equatable {
        package var name: String
        package var type: String
        package var label: String
        package var uuid: String
        package init(name: String, type: String, label: String, uuid: String) {
            self.name = name; self.type = type; self.label = label; self.uuid = uuid
        }
    }

    package struct Entry: Sendable, Equatable {
        package var volume: Int
        package var kind: Character
        package var permissions: UInt32
        package var uid: UInt32
        package var gid: UInt32
        package var size: UInt64
        package var mtimeSeconds: Int64
        package var mtimeNanoseconds: UInt32
        package var path: String
        package init(volume: Int, kind: Character, permissions: UInt32, uid: UInt32, gid: UInt32, size: UInt64,
                     mtimeSeconds: Int64, mtimeNanoseconds: UInt32, path: String) {
            self.volume = volume; self.kind = kind; self.permissions = permissions; self.uid = uid; self.gid = gid
            self.size = size; self.mtimeSeconds = mtimeSeconds; self.mtimeNanoseconds = mtimeNanoseconds; self.path = path
        }
    }

    package static let header = "cairn-catalog 1"
    package static let kinds: Set<Character> = ["-", "d", "l", "c", "b", "p", "s", "?"]

    package var volumes: [VolumeInfo]
    package var entries: [Entry]

    package init(volumes: [VolumeInfo] = [], entries: [Entry] = []) {
        self.volumes = volumes
        self.entries = entries
    }

    package func encode() -> [UInt8] {
        var out = Self.header + "\n"
        for v in volumes {
            out += "V\t\(Self.escape(v.name))\t\(Self.escape(v.type))\t\(Self.escape(v.label))\t\(Self.escape(v.uuid))\n"
        }
        for e in entries {
            out += "F\t\(e.volume)\t\(e.kind)\t\(String(e.permissions, radix: 8))\t\(e.uid)\t\(e.gid)\t\(e.size)\t"
            out += "\(e.mtimeSeconds)\t\(e.mtimeNanoseconds)\t\(Self.escape(e.path))\n"
        }
        return Array(out.utf8)
    }

    package static func decode(_ bytes: [UInt8], what: String) throws -> FileCatalog {
        guard let text = String(validating: bytes, as: UTF8.self) else {
            throw CairnError(.corrupt, "\(what): catalog is not UTF-8 text")
        }
        var catalog = FileCatalog()
        var lineNumber = 0
        // Lines split on LF scalars (a CR before it would make one Character with it).
        for lineScalars in text.unicodeScalars.split(separator: "\n", omittingEmptySubsequences: false) {
            let line = Substring(lineScalars)
            lineNumber += 1
            if lineNumber == 1 {
                guard line == header else {
                    throw CairnError(.unsupported, "\(what): catalog header is '\(line.prefix(40))', expected '\(header)'")
                }
                continue
            }
            if line.isEmpty { continue }
            let f = line.unicodeScalars.split(separator: "\t", omittingEmptySubsequences: false).map { Substring($0) }
            func bad(_ why: String) -> CairnError { CairnError(.corrupt, "\(what): catalog line \(lineNumber): \(why)") }
            switch f.first {
            case "V":
                guard f.count == 5 else { throw bad("a volume record has \(f.count) fields, not 5") }
                catalog.volumes.append(VolumeInfo(name: try unescape(f[1], bad), type: try unescape(f[2], bad),
                                                  label: try unescape(f[3], bad), uuid: try unescape(f[4], bad)))
            case "F":
                guard f.count == 10 else { throw bad("a file record has \(f.count) fields, not 10") }
                guard let volume = Int(f[1]), volume >= 0, volume < catalog.volumes.count else { throw bad("volume number '\(f[1])' is not a listed volume") }
                guard f[2].count == 1, let kind = f[2].first, kinds.contains(kind) else { throw bad("unknown file kind '\(f[2])'") }
                guard let perm = UInt32(f[3], radix: 8), perm <= 0o7777 else { throw bad("permissions '\(f[3])' are not octal 0..7777") }
                guard let uid = UInt32(f[4]), let gid = UInt32(f[5]) else { throw bad("owner '\(f[4]):\(f[5])' is not numeric") }
                guard let size = UInt64(f[6]) else { throw bad("size '\(f[6])' is not a number") }
                guard let sec = Int64(f[7]), let ns = UInt32(f[8]), ns < 1_000_000_000 else { throw bad("time '\(f[7]).\(f[8])' is invalid") }
                catalog.entries.append(Entry(volume: volume, kind: kind, permissions: perm, uid: uid, gid: gid, size: size,
                                             mtimeSeconds: sec, mtimeNanoseconds: ns, path: try unescape(f[9], bad)))
            default:
                throw bad("unknown record type '\(f.first.map { String($0.prefix(8)) } ?? "")'")
            }
        }
        guard lineNumber >= 1 else { throw CairnError(.corrupt, "\(what): catalog is empty") }
        return catalog
    }

    // Escaping works on Unicode scalars, not Characters: "\r\n" is one Character in Swift.
    static func escape(_ s: String) -> String {
        guard s.unicodeScalars.contains(where: { $0 == "\\" || $0 == "\t" || $0 == "\n" || $0 == "\r" }) else { return s }
        var out = String.UnicodeScalarView()
        for c in s.unicodeScalars {
            switch c {
            case "\\": out.append(contentsOf: "\\\\".unicodeScalars)
            case "\t": out.append(contentsOf: "\\t".unicodeScalars)
            case "\n": out.append(contentsOf: "\\n".unicodeScalars)
            case "\r": out.append(contentsOf: "\\r".unicodeScalars)
            default: out.append(c)
            }
        }
        return String(out)
    }

    static func unescape(_ s: Substring, _ bad: (String) -> CairnError) throws -> String {
        guard s.unicodeScalars.contains("\\") else { return String(s) }
        var out = String.UnicodeScalarView()
        var it = s.unicodeScalars.makeIterator()
        while let c = it.next() {
            guard c == "\\" else { out.append(c); continue }
            switch it.next() {
            case "\\": out.append("\\")
            case "t": out.append("\t")
            case "n": out.append("\n")
            case "r": out.append("\r")
            default: throw bad("bad escape in '\(s.prefix(60))'")
            }
        }
        return String(out)
    }
}
