import ArgumentParser
import CairnCore
import Engine
import Foundation
import Repository

struct Check: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Check the repository: every snapshot's manifest and indexes, every referenced chunk present; with --read-data every chunk's bytes."
    )

    @OptionGroup var options: RepositoryOptions

    @Flag(help: "Read, decrypt, decompress and digest-check every referenced chunk.")
    var readData = false

    @Option(help: "Read only a subset of the chunks: a random percentage (10%) or group n of m (1/5).")
    var readDataSubset: String?

    func run() throws {
        var selection: ReadDataSelection = readData ? .all : .none
        if let readDataSubset {
            guard !readData else { throw CairnError(.usage, "give --read-data or --read-data-subset, not both") }
            selection = try ReadDataSelection.parse(readDataSubset)
        }
        let repo = try options.open()
        let cancel = CancellationToken()
        let signals = installSignalHandlers(cancel)
        defer { signals.forEach { $0.cancel() } }
        let report = try CheckJob(repository: repo, readData: selection, progress: options.progress(), cancel: cancel).run()
        if options.json {
            let enc = JSONEncoder()
            enc.outputFormatting = [.prettyPrinted, .sortedKeys]
            FileHandle.standardOutput.write(try enc.encode(report) + Data("\n".utf8))
        } else {
            print("\(report.snapshots) snapshots, \(report.indexes) indexes, \(report.referencedChunks) chunks referenced, \(report.storedChunks) stored, \(report.unreferencedChunks) unreferenced")
            if report.unreferencedChunks + report.unreferencedIndexes > 0 {
                print("\(report.unreferencedChunks) chunks and \(report.unreferencedIndexes) indexes are referenced by no snapshot (not an error; `cairn gc` removes them)")
            }
            if selection != .none { print("read \(report.chunksRead) chunks (\(ByteCount.format(report.bytesRead)))") }
            if report.verifications > 0 {
                print("\(report.verifications) verification records\(report.orphanedVerifications > 0 ? ", \(report.orphanedVerifications) of snapshots that no longer exist (not an error; `cairn gc` removes them)" : "")")
            }
            for p in report.problems {
                print("error: \(p.state) \(p.kind) \(p.object): \(p.message)")
                for a in p.affected { print("  used by \(a)") }
            }
            print(report.ok ? "no errors found" : "\(report.problems.count) problem\(report.problems.count == 1 ? "" : "s") found")
        }
        if !report.ok {
            throw CairnError(.corrupt, "check found \(report.problems.count) problem\(report.problems.count == 1 ? "" : "s")")
        }
    }
}

struct Stats: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Show logical and stored sizes, deduplication and compression ratios.")

    @OptionGroup var options: RepositoryOptions

    func run() throws {
        let repo = try options.open()
        let s = try RepositoryStats.compute(repository: repo)
        if options.json {
            let enc = JSONEncoder()
            enc.outputFormatting = [.prettyPrinted, .sortedKeys]
            enc.keyEncodingStrategy = .convertToSnakeCase
            FileHandle.standardOutput.write(try enc.encode(s) + Data("\n".utf8))
            return
        }
        print("snapshots:            \(s.snapshots) (\(s.disks) disks)")
        print("logical size:         \(ByteCount.format(s.logicalBytes)) (sum of virtual disk sizes)")
        print("data referenced:      \(ByteCount.format(s.referencedDataBytes)) (non-zero chunks)")
        print("unique data:          \(ByteCount.format(s.uniqueDataBytes)) in \(s.chunks) chunks")
        print("stored:               \(ByteCount.format(s.storedBytes)) (chunks \(ByteCount.format(s.storedChunkBytes)))")
        print("deduplication ratio:  \(s.deduplicationRatio)x")
        print("compression ratio:    \(s.compressionRatio)x")
        print("logical / stored:     \(s.totalRatio)x")
    }
}
