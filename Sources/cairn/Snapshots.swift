import ArgumentParser
import CairnCore
import Engine
import Foundation
import Repository
import RepositoryFormat

struct Snapshots: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "List snapshots.")

    @OptionGroup var options: RepositoryOptions

    @Option(help: "Only snapshots of this VM.")
    var vm: String?

    func run() throws {
        let repo = try options.open()
        let codec = repo.makeCodec()
        let (all, failures) = try repo.listSnapshots(codec: codec)
        let list = all.filter { vm == nil || $0.manifest.vm == vm }
        let protected = try repo.markedSnapshots(.protected), damaged = try repo.markedSnapshots(.damaged)
        let verified = try repo.latestVerifications()
        for (name, e) in failures { printError("cairn: warning: snapshot \(name) is unreadable: \(e.description)") }
        if options.json {
            let arr: [[String: Any]] = list.map { s in
                ["id": s.id.hex, "short_id": s.id.short, "vm": s.manifest.vm, "time": s.manifest.time, "host": s.manifest.host,
                 "tags": s.manifest.tags, "protected": protected.contains(s.id.hex), "damaged": damaged.contains(s.id.hex),
                 "consistency": s.manifest.consistency, "tool_version": s.manifest.toolVersion,
                 "verified": verified[s.id.hex].map { verificationJSON($0) as Any } ?? NSNull(),
                 "disks": s.manifest.disks.map { d in
                     ["name": d.name, "size": d.virtualSize, "format": d.sourceFormat, "source": d.sourcePath, "index": d.index,
                      "bytes_read": d.bytesRead, "bytes_new": d.bytesNew, "bytes_deduplicated": d.bytesDeduplicated,
                      "bytes_zero": d.bytesZero, "bytes_stored": d.bytesStored, "bytes_free": d.bytesFree.map { $0 as Any } ?? NSNull(),
                      "skip_free": d.skipFreeSpace.map { $0 as Any } ?? NSNull(), "volumes": d.volumes.map { $0 as Any } ?? NSNull(),
                      "catalog": d.catalog.map { $0 as Any } ?? NSNull()] as [String: Any]
                 }]
            }
            let d = try JSONSerialization.data(withJSONObject: arr, options: [.prettyPrinted, .sortedKeys])
            FileHandle.standardOutput.write(d + Data("\n".utf8))
            return
        }
        print("ID        Time                      VM               Verified             Disks")
        print(String(repeating: "-", count: 99))
        for s in list {
            let disks = s.manifest.disks.map { "\($0.name) (\(ByteCount.format($0.virtualSize)))" }.joined(separator: ", ")
            let time = String(s.manifest.time.prefix(19)).replacingOccurrences(of: "T", with: " ")
            var line = "\(s.id.short)  \(time.padding(toLength: 24, withPad: " ", startingAt: 0))  \(s.manifest.vm.padding(toLength: 15, withPad: " ", startingAt: 0))  \(verifiedSummary(verified[s.id.hex]).padding(toLength: 19, withPad: " ", startingAt: 0))  \(disks)"
            if !s.manifest.tags.isEmpty { line += "  [\(s.manifest.tags.joined(separator: ","))]" }
            if protected.contains(s.id.hex) { line += "  (protected)" }
            if damaged.contains(s.id.hex) { line += "  (DAMAGED: see `cairn repair`)" }
            print(line)
        }
        print(String(repeating: "-", count: 99))
        print("\(list.count) snapshot\(list.count == 1 ? "" : "s")")
    }
}
