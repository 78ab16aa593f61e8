import ArgumentParser
import CairnCore
import Engine
import Foundation
import GuestFS
import Repository
import RepositoryFormat
#if canImport(Glibc)
import Glibc
#endif

struct Diff: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "diff",
        abstract: "Show files added, removed and changed between two snapshots of a disk.",
        discussion: """
        Lines start with + (added), - (removed), M (content changed: size, modification time, link
        target, or bytes with --content), U (mode or owner changed only), T (type changed).
        SNAPSHOT[:DISK] and PATH as for `cairn ls`; PATH limits the comparison to a subtree.
        """
    )

    @OptionGroup var options: RepositoryOptions

    @Option(help: "VM whose latest snapshot 'latest' means.")
    var vm: String?

    @Flag(help: "Also compare the bytes of files whose size and modification time are equal.")
    var content = false

    @Argument(help: "The older SNAPSHOT[:DISK].")
    var first: String

    @Argument(help: "The newer SNAPSHOT[:DISK].")
    var second: String

    @Argument(help: "Path inside the disk (default: /).")
    var path = "/"

    struct Node {
        var fs: any FileSystem
        var node: UInt64
        var meta: FileMetadata
    }

    func run() throws {
        let repo = try options.open()
        let lock = try repo.lock(exclusive: false, job: "diff")
        defer { lock.release() }
        let a = try SnapshotDiskRef(first).open(repo, vm: vm)
        let b = try SnapshotDiskRef(second).open(repo, vm: vm)
        let left = try tree(a), right = try tree(b)
        var counts: [Character: Int] = [:]
        func emit(_ c: Character, _ p: String) {
            counts[c, default: 0] += 1
            if options.json {
                printJSONLine(["change": String(c), "path": p])
            } else {
                print("\(c)    \(p)")
            }
        }
        for p in Set(left.keys).union(right.keys).sorted() {
            switch (left[p], right[p]) {
            case (nil, .some): emit("+", p)
            case (.some, nil): emit("-", p)
            case (.some(let x), .some(let y)):
                if let c = try compare(x, y) { emit(c, p) }
            case (nil, nil): break
            }
        }
        if !options.json && !options.quiet {
            print("added \(counts["+"] ?? 0), removed \(counts["-"] ?? 0), changed \(counts["M"] ?? 0), metadata only \(counts["U"] ?? 0), type changed \(counts["T"] ?? 0)")
        }
    }

    /// Every entry below `path` in one snapshot disk, keyed by its full path.
    private func tree(_ view: GuestView) throws -> [String: Node] {
        var out: [String: Node] = [:]
        func walkVolume(_ v: Volume, inner: String) throws {
            guard let fs = v.fileSystem else { return }
            let prefix = view.isBareFileSystem ? "" : "/" + v.name
            let start = try fs.lookup(inner, followLast: false)
            let meta = try fs.metadata(of: start)
            guard meta.kind == .directory else {
                out[prefix + inner] = Node(fs: fs, node: start, meta: meta)
                return
            }
            try fs.walk(from: start, prefix: inner == "/" ? "" : inner) { p, entry, m in
                out[prefix + p] = Node(fs: fs, node: entry.node, meta: m)
            }
        }
        switch try view.locate(path) {
        case .volumes(let prefix):
            for v in view.layout.volumes where prefix.isEmpty || v.name.hasPrefix(prefix + "/") { try walkVolume(v, inner: "/") }
        case .inVolume(let v, let inner):
            try walkVolume(v, inner: inner)
        }
        return out
    }

    private func compare(_ x: Node, _ y: Node) throws -> Character? {
        if x.meta.kind != y.meta.kind { return "T" }
        switch x.meta.kind {
        case .symlink:
            if try x.fs.readLink(x.node) != y.fs.readLink(y.node) { return "M" }
        case .regular:
            if x.meta.size != y.meta.size || x.meta.modified != y.meta.modified { return "M" }
            if content, try !sameBytes(x, y) { return "M" }
        case .directory:
            break   // their entries are compared one by one
        default:
            if x.meta.device != y.meta.device { return "M" }
        }
        if x.meta.permissions != y.meta.permissions || x.meta.uid != y.meta.uid || x.meta.gid != y.meta.gid { return "U" }
        return nil
    }

    /// Same content: `x` read piece by piece, each piece compared with `y` at the same offset
    /// (the sizes are already equal when this is asked).
    private func sameBytes(_ x: Node, _ y: Node) throws -> Bool {
        let bx = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 64)
        let by = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 64)
        defer { bx.deallocate(); by.deallocate() }
        struct Differs: Error {}
        do {
            let read = try x.fs.forEachPiece(of: x.node, size: x.meta.size, buffer: bx) { piece, offset in
                let theirs = UnsafeMutableRawBufferPointer(rebasing: by[0..<piece.count])
                let got = try y.fs.read(y.node, into: theirs, at: offset)
                if got != piece.count || memcmp(piece.baseAddress!, theirs.baseAddress!, got) != 0 { throw Differs() }
            }
            // A file that ends early on one side only differs.
            if read < x.meta.size {
                let probe = UnsafeMutableRawBufferPointer(rebasing: by[0..<1])
                return try y.fs.read(y.node, into: probe, at: read) == 0
            }
            return true
        } catch is Differs {
            return false
        }
    }
}

struct Find: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "find",
        abstract: "Find files by name across all restore points, from the catalogs made at backup time.",
        discussion: """
        PATTERN is a shell glob (*, ?, [...]). Without a '/', it is matched against file names;
        with one, against whole paths as `cairn ls` shows them (/p1/etc/*). Each match is shown
        once per path with every snapshot that holds it, oldest first. Snapshots made with
        --no-catalog (or before catalogs existed) are not searched; their count is reported.
        """
    )

    @OptionGroup var options: RepositoryOptions

    @Option(help: "Only snapshots of this VM.")
    var vm: String?

    @Flag(name: .short, help: "Match case-insensitively.")
    var ignoreCase = false

    @Argument(help: "Glob pattern.")
    var pattern: String

    func run() throws {
        let repo = try options.open()
        let lock = try repo.lock(exclusive: false, job: "find")
        defer { lock.release() }
        let codec = repo.makeCodec()
        let (all, failures) = try repo.listSnapshots(codec: codec)
        for (name, e) in failures { printError("cairn: warning: snapshot \(name) is unreadable: \(e.description)") }
        let snapshots = all.filter { vm == nil || $0.manifest.vm == vm }.sorted { $0.date < $1.date }
        let wholePath = pattern.contains("/")
        // Case folding by lowercasing both sides (glibc's FNM_CASEFOLD is not visible to Swift).
        let pattern = ignoreCase ? self.pattern.lowercased() : self.pattern
        struct Version { var snapshot: SnapshotEntry; var entry: FileCatalog.Entry }
        var found: [String: [Version]] = [:]
        var order: [String] = []
        var withoutCatalog = 0
        for s in snapshots {
            for d in s.manifest.disks {
                guard let catalog = try CatalogStore.load(repository: repo, snapshot: s, disk: d) else {
                    withoutCatalog += 1
                    continue
                }
                let bare = catalog.volumes.count == 1 && catalog.volumes[0].name.isEmpty
                for e in catalog.entries {
                    let shown = bare ? e.path : "/" + catalog.volumes[e.volume].name + e.path
                    let name = wholePath ? shown : (e.path as NSString).lastPathComponent
                    guard fnmatch(pattern, ignoreCase ? name.lowercased() : name, 0) == 0 else { continue }
                    let key = "\(s.manifest.vm)\t\(d.name)\t\(shown)"
                    if found[key] == nil { order.append(key) }
                    found[key, default: []].append(Version(snapshot: s, entry: e))
                }
            }
        }
        for key in order {
            let parts = key.split(separator: "\t", maxSplits: 2).map(String.init)
            let versions = found[key] ?? []
            if options.json {
                printJSONLine(["vm": parts[0], "disk": parts[1], "path": parts[2], "versions": versions.map { v in
                    ["snapshot": v.snapshot.id.hex, "time": v.snapshot.manifest.time, "type": String(v.entry.kind),
                     "mode": Int(v.entry.permissions), "size": v.entry.size, "mtime": v.entry.mtimeSeconds] as [String: Any]
                }])
                continue
            }
            print("\(parts[2])  (vm \(parts[0]), disk \(parts[1]))")
            var previous: FileCatalog.Entry?
            for v in versions {
                let e = v.entry
                let same = previous.map { $0.size == e.size && $0.mtimeSeconds == e.mtimeSeconds && $0.mtimeNanoseconds == e.mtimeNanoseconds && $0.kind == e.kind } ?? false
                let time = String(v.snapshot.manifest.time.prefix(19)).replacingOccurrences(of: "T", with: " ")
                print("  \(v.snapshot.id.short)  \(time)  \(modeString(e.kind, e.permissions))  \(String(e.size).leftPad(12))  modified \(timeString(e.mtimeSeconds))\(same ? "  (unchanged)" : "")")
                previous = e
            }
        }
        if !options.json && !options.quiet {
            print("\(order.count) path\(order.count == 1 ? "" : "s") in \(snapshots.count) snapshot\(snapshots.count == 1 ? "" : "s")" +
                  (withoutCatalog > 0 ? " (\(withoutCatalog) disk\(withoutCatalog == 1 ? "" : "s") without a catalog not searched)" : ""))
        }
    }
}
