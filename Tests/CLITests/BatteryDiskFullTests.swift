import CairnCore
import CairnTestSupport
import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// Disk-full battery: a repository on a small tmpfs that a backup fills up. The backup fails
/// cleanly (status 1, "No space left on device" and the path), leaves no snapshot, the next
/// command finds the repository consistent with nothing in tmp/, and once space is freed the
/// same backup succeeds and restores byte-identical.
@Suite("Battery: disk full", .serialized)
struct BatteryDiskFullTests {
    @Test("backup into a full file system: status 1 naming the path, no snapshot, tmp/ cleaned, success after freeing space",
          .timeLimit(.minutes(10)))
    func backupIntoFullFileSystem() throws {
        let env = try CLIEnv("battery-full")
        let mnt = env.file("mnt")
        try FileManager.default.createDirectory(atPath: mnt, withIntermediateDirectories: true)
        let mount = try Tool.run("mount", ["-t", "tmpfs", "-o", "size=24m", "tmpfs", mnt], check: false)
        guard mount.status == 0 else {
            Issue.record("cannot mount a 24 MiB tmpfs at \(mnt) (this test needs root; uid \(getuid())): mount exited \(mount.status): \(mount.stderr)\(mount.stdout)")
            return
        }
        defer {
            _ = try? Tool.run("umount", ["-l", mnt], check: false)
            // The scratch directory (with the mount point) must outlive the mount.
            withExtendedLifetime(env) {}
        }

        let repo = (mnt as NSString).appendingPathComponent("repo")
        var cli = env.cli
        cli.repository = repo
        @discardableResult
        func expect(_ status: Int32, _ args: [String], sourceLocation: SourceLocation = #_sourceLocation) throws -> CLIResult {
            let r = try cli.run(args)
            #expect(r.exitedNormally && r.status == status, "expected exit status \(status): \(r)", sourceLocation: sourceLocation)
            return r
        }
        func files(_ sub: String) -> [String] {
            let base = (repo as NSString).appendingPathComponent(sub)
            guard let e = FileManager.default.enumerator(atPath: base) else { return [] }
            return e.allObjects.compactMap { $0 as? String }.filter { rel in
                var isDir: ObjCBool = false
                return FileManager.default.fileExists(atPath: (base as NSString).appendingPathComponent(rel), isDirectory: &isDir) && !isDir.boolValue
            }
        }
        func snapshotIDs() throws -> Set<String> {
            let r = try expect(0, ["snapshots", "--json"])
            let arr = try #require(try JSONSerialization.jsonObject(with: r.stdoutData) as? [[String: Any]], "\(r)")
            return Set(arr.compactMap { $0.string("id") })
        }
        func freeBytes() -> Int {
            var st = statvfs()
            guard statvfs(mnt, &st) == 0 else { return -1 }
            return Int(st.f_bavail) * Int(st.f_frsize)
        }

        // An encrypted repository with the default 512 KiB chunks, and one small snapshot.
        try expect(0, ["init"])
        let small = env.file("small.raw")
        try Disk.dense(small, size: 1 * MiB, seed: 51)
        try expect(0, ["backup", "--vm", "small", small])
        let before = try snapshotIDs()
        #expect(before.count == 1)

        // Fill the file system but 6 MiB, then back up 16 MiB of incompressible data.
        let filler = (mnt as NSString).appendingPathComponent("filler")
        let fillerSize = freeBytes() - 6 * MiB
        #expect(fillerSize > 8 * MiB, "the tmpfs has room for a filler (\(freeBytes()) bytes free)")
        try Disk.dense(filler, size: fillerSize, seed: 52)
        let disk = env.file("big.raw")
        try Disk.dense(disk, size: 16 * MiB, seed: 53)
        let chunksBefore = files("chunks").count
        let full = try expect(1, ["backup", "--vm", "big", disk])
        #expect(full.stderr.contains("No space left on device"), "the error says the disk is full: \(full.stderr)")
        #expect(full.stderr.contains(repo + "/"), "the error names the path it could not write: \(full.stderr)")
        #expect(!full.stdout.contains("saved"), "no snapshot reported: \(full.stdout)")
        let storedByFailed = files("chunks").count - chunksBefore
        let freeAfterFailure = freeBytes()
        let tmpAfterFailure = files("tmp").count

        // No new snapshot; the failed backup released its lock.
        #expect(try snapshotIDs() == before, "no snapshot appeared")
        #expect(files("locks").isEmpty, "the failed backup released its lock: \(files("locks"))")
        // The next locking command (check) finds the repository consistent, and leaves no
        // temporary file of the failed process in tmp/.
        let check = try expect(0, ["check"])
        #expect(check.stdout.contains("no errors found"), "\(check)")
        #expect(files("tmp").isEmpty, "tmp/ is empty after the next command: \(files("tmp"))")
        #expect(files("locks").isEmpty, "\(files("locks"))")
        #expect(try snapshotIDs() == before)

        // Space freed: the same backup succeeds and reuses what the failed one stored.
        try FileManager.default.removeItem(atPath: filler)
        let ok = try expect(0, ["backup", "--vm", "big", "--json", disk])
        let summary = ok.stdout.split(separator: "\n")
            .compactMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }
            .first { $0.string("type") == "summary" }
        let d = (summary?["disks"] as? [[String: Any]])?.first
        let dedup = d?.int("bytes_deduplicated") ?? -1
        #expect(dedup == storedByFailed * 512 * KiB, "the retry reuses the \(storedByFailed) chunks the failed backup stored: \(ok.stdout)")
        try expect(0, ["check", "--read-data"])
        #expect(try snapshotIDs().count == 2)
        let out = env.file("restored.raw")
        try expect(0, ["restore", "latest", "--vm", "big", "--to", out, "--format", "raw"])
        #expect(try Disk.cmpEqual(disk, out), "the restore is byte-identical to the disk")
        let out2 = env.file("restored-small.raw")
        try expect(0, ["restore", "latest", "--vm", "small", "--to", out2, "--format", "raw"])
        #expect(try Disk.cmpEqual(small, out2))
        #expect(files("tmp").isEmpty && files("locks").isEmpty)
        let firstLine = full.stderr.split(separator: "\n").first.map(String.init) ?? ""
        print("BATTERY disk-full: failed backup exit \(full.status) (\(firstLine)); it stored \(storedByFailed) chunks, \(freeAfterFailure) bytes free and \(tmpAfterFailure) files in tmp/ after it; retry reused \(dedup) bytes; check --read-data clean; restores byte-identical")
    }
}
