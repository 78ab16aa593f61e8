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
                      "catalog": d.catalog.map { $0 as Any } ?? NSNull(),
                      "read_mode": d.readMode.map { $0 as Any } ?? NSNull(), "read_note": d.readNote.map { $0 as Any } ?? NSNull(),
                      "base": d.base.map { $0 as Any } ?? NSNull(), "cbt_bitmap": d.cbtBitmap.map { $0 as Any } ?? NSNull()] as [String: Any]
                 },
                 "source": s.manifest.source.map { $0 as Any } ?? NSNull(),
                 "vm_config": s.manifest.vmConfig.flatMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) } ?? NSNull()]
            }
            let d = try JSONSerialization.data(withJSONObject: arr, options: [.prettyPrinted, .sortedKeys])
            FileHandle.standardOutput.write(d + Data("\n".utf8))
            return
        }
        func pad(_ s: String, _ n: Int) -> String { s.count >= n ? s : s.padding(toLength: n, withPad: " ", startingAt: 0) }
        print("ID        Time                  VM               Read       Bytes read  Consistency  Verified             Disks")
        print(String(repeating: "-", count: 120))
        for s in list {
            let disks = s.manifest.disks.map { "\($0.name) (\(ByteCount.format($0.virtualSize)))" }.joined(separator: ", ")
            let time = String(s.manifest.time.prefix(19)).replacingOccurrences(of: "T", with: " ")
            // How the disks were read: full / cbt / hash-scan (live backups), image (image files).
            let modes = Set(s.manifest.disks.map { $0.readMode ?? "image" })
            let mode = modes.count == 1 ? modes.first! : "mixed"
            let read = ByteCount.format(s.manifest.disks.reduce(UInt64(0)) { $0 + $1.bytesRead })
            var line = "\(s.id.short)  \(pad(time, 20))  \(pad(s.manifest.vm, 15))  \(pad(mode, 9))  \(pad(read, 10))  \(pad(s.manifest.consistency, 11))  \(pad(verifiedSummary(verified[s.id.hex]), 19))  \(disks)"
            if !s.manifest.tags.isEmpty { line += "  [\(s.manifest.tags.joined(separator: ","))]" }
            if protected.contains(s.id.hex) { line += "  (protected)" }
            if damaged.contains(s.id.hex) { line += "  (DAMAGED: see `cairn repair`)" }
            print(line)
        }
        print(String(repeating: "-", count: 120))
        print("\(list.count) snapshot\(list.count == 1 ? "" : "s")")
    }
}
