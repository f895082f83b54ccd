package vigthoria

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
	"unicode"

	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/spf13/cobra"
	"github.com/vigthoria/caddy-vigthoria/caller/keys"
	"github.com/vigthoria/caddy-vigthoria/policy"
	"github.com/vigthoria/caddy-vigthoria/store"
)

func init() {
	caddycmd.RegisterCommand(caddycmd.Command{
		Name:  "vigthoria",
		Usage: "key add|list|show|update|revoke|rotate … | usage [<id>] | signing-key rotate|list",
		Short: "Manages the client keys of the vigthoria handler",
		Long: `
Adds, lists, revokes and rotates the client keys that the vigthoria handler
accepts, in its key store. A running Caddy sees every change within a second,
without a reload.

  caddy vigthoria key add --tier pro --name alice [--expires 720h] [--mint free,basic] [settings]
  caddy vigthoria key list
  caddy vigthoria key show <id> [--config Caddyfile]
  caddy vigthoria key update <id> [settings] [--clear-<setting>…]
  caddy vigthoria key revoke <id>
  caddy vigthoria key rotate <id>
  caddy vigthoria usage [<id>]

A key's own settings replace its tier's of the same name; those it does
not set follow the tier, and its changes:

  --requests 100/1m   --tokens 200000/1m   --concurrent 5
  --quota 10000000/month   --budget 50/month   --max-tokens 2048
  --models 'vigthoria-fast-*'   --origins https://app.example.com

--origins binds the key to the web pages of those origins: a request with
another Origin header is refused with 403. update changes the settings
given and --clear-<setting> makes one follow the tier again; show prints
each setting and where it comes from, the tier's values taken from the
Caddyfile given with --config.

--mint lets the key's holder, an app's backend, mint short-lived tokens of
those tiers for its own users (POST /vigthoria/tokens).

Minted tokens are signed with a signing key in the same store, which every
instance sharing the store verifies:

  caddy vigthoria signing-key rotate
  caddy vigthoria signing-key list

rotate adds a new signing key, which every running Caddy signs with once it
has been published for 2 seconds, so that every instance knows it first;
tokens signed with the older ones stay valid until they expire. It also
removes the keys retired more than 24 hours ago (the longest life of a
token). list shows the keys' IDs and states, never the private keys.
usage of mint:<key ID>:<user> prints one minted token user's rows; a
minting key's own rows hold its users' usage.

--store names the store, as in the Caddyfile: sqlite:PATH or redis://HOST:PORT/DB.
Default: sqlite:<Caddy data dir>/vigthoria/vigthoria.db. Run the command as the
user Caddy runs as (or give --store), or it looks in another data directory.

A key's secret is printed once, by add and rotate, and is stored nowhere: the
store keeps only its SHA-256.
`,
		CobraFunc: buildCommand,
	})
}

// RunCLI runs `caddy vigthoria` with args (those after "vigthoria"),
// printing to stdout and stderr, and returns the exit status.
func RunCLI(args []string, stdout, stderr io.Writer) int {
	cmd := &cobra.Command{Use: "vigthoria", SilenceErrors: true}
	buildCommand(cmd)
	cmd.SetArgs(args)
	cmd.SetOut(stdout)
	cmd.SetErr(stderr)
	if err := cmd.Execute(); err != nil {
		fmt.Fprintf(stderr, "Error: %v\n", err)
		return 1
	}
	return 0
}

// buildCommand adds the subcommands and flags to the vigthoria command.
func buildCommand(cmd *cobra.Command) {
	cmd.PersistentFlags().String("store", "",
		"key store: sqlite:PATH or redis://HOST:PORT/DB (default sqlite:<Caddy data dir>/vigthoria/vigthoria.db)")

	// Runnable, so that a mistyped subcommand is an error rather than
	// the help.
	help := func(cmd *cobra.Command, _ []string) error { return cmd.Help() }
	cmd.Args, cmd.RunE = cobra.NoArgs, help
	key := &cobra.Command{
		Use:   "key",
		Short: "Adds, lists, revokes and rotates client keys",
		Args:  cobra.NoArgs,
		RunE:  help,
	}
	add := &cobra.Command{
		Use:   "add --tier <tier> --name <name> [--expires <duration>] [--mint <tier>,…]",
		Short: "Creates a key and prints its secret, once",
		Args:  cobra.NoArgs,
		RunE:  cliAdd,
	}
	add.Flags().String("tier", "", "the key's tier, as configured in the Caddyfile (required)")
	add.Flags().String("name", "", "who or what the key is for (required)")
	add.Flags().String("expires", "", "lifetime, such as 720h or 30d, or an RFC 3339 time (default: never)")
	add.Flags().String("mint", "", "tiers, separated by commas, that the key may mint tokens of for its users (default: none)")
	addSettingFlags(add, false)
	_ = add.MarkFlagRequired("tier")
	_ = add.MarkFlagRequired("name")
	update := &cobra.Command{
		Use:   "update <id> [--<setting> <value>…] [--clear-<setting>…]",
		Short: "Changes a key's own settings; a cleared one follows the tier again",
		Args:  cobra.ExactArgs(1),
		RunE:  cliUpdate,
	}
	addSettingFlags(update, true)
	show := &cobra.Command{
		Use:   "show <id> [--config <Caddyfile>]",
		Short: "Prints a key and each of its settings, and whether it is the key's own or its tier's",
		Args:  cobra.ExactArgs(1),
		RunE:  cliShow,
	}
	show.Flags().String("config", "", "the Caddyfile (or JSON config) whose tiers to show the values of")
	list := &cobra.Command{
		Use:   "list",
		Short: "Lists the keys, never their secrets",
		Args:  cobra.NoArgs,
		RunE:  cliList,
	}
	revoke := &cobra.Command{
		Use:   "revoke <id>",
		Short: "Revokes a key for good",
		Args:  cobra.ExactArgs(1),
		RunE:  cliRevoke,
	}
	rotate := &cobra.Command{
		Use:   "rotate <id>",
		Short: "Gives a key a new secret, printed once; the old one stops working",
		Args:  cobra.ExactArgs(1),
		RunE:  cliRotate,
	}
	usage := &cobra.Command{
		Use:   "usage [<id>]",
		Short: "Prints what keys used this month, by day and model",
		Args:  cobra.MaximumNArgs(1),
		RunE:  cliUsage,
	}
	signing := &cobra.Command{
		Use:   "signing-key",
		Short: "Rotates and lists the keys that minted tokens are signed with",
		Args:  cobra.NoArgs,
		RunE:  help,
	}
	signingRotate := &cobra.Command{
		Use:   "rotate",
		Short: "Adds a signing key to sign with, and removes keys retired more than a day ago",
		Args:  cobra.NoArgs,
		RunE:  cliSigningRotate,
	}
	signingList := &cobra.Command{
		Use:   "list",
		Short: "Lists the signing keys, never their private keys",
		Args:  cobra.NoArgs,
		RunE:  cliSigningList,
	}
	for _, c := range []*cobra.Command{add, update, show, list, revoke, rotate, usage, signingRotate, signingList} {
		c.SilenceUsage = true // a failed command says why; the usage would bury it
	}
	key.AddCommand(add, update, show, list, revoke, rotate)
	signing.AddCommand(signingRotate, signingList)
	cmd.AddCommand(key, usage, signing)
}

// cliStore opens the store of the --store flag. Only create makes a new
// SQLite file: a mistyped path should not look like an empty store.
func cliStore(cmd *cobra.Command, create bool) (store.Backend, string, error) {
	spec, err := cmd.Flags().GetString("store")
	if err != nil {
		return nil, "", err
	}
	if spec == "" {
		spec = "sqlite:" + store.DefaultSQLitePath()
	}
	kind, target, err := store.ParseSpec(spec)
	if err != nil {
		return nil, "", err
	}
	if kind == "sqlite" && !create {
		if _, err := os.Stat(target); errors.Is(err, fs.ErrNotExist) {
			return nil, "", fmt.Errorf("no key store at %s: give the store of your Caddyfile with --store sqlite:PATH", target)
		}
	}
	st, err := store.Open(spec)
	return st, store.Display(kind, target), err
}

func cliAdd(cmd *cobra.Command, _ []string) error {
	tier, _ := cmd.Flags().GetString("tier")
	name, _ := cmd.Flags().GetString("name")
	exp, _ := cmd.Flags().GetString("expires")
	mint, _ := cmd.Flags().GetString("mint")
	now := time.Now()
	expires, err := parseExpiry(exp, now)
	if err != nil {
		return err
	}
	a := keys.Attrs{Name: name, Tier: tier, Expires: expires}
	if mint != "" {
		a.Mint = strings.Split(mint, ",")
	}
	if err := settingsFromFlags(cmd, &a.Settings); err != nil {
		return err
	}
	st, spec, err := cliStore(cmd, true)
	if err != nil {
		return err
	}
	defer st.Close()
	rec, secret, err := keys.Create(cmd.Context(), st, a, now)
	if err != nil {
		return err
	}
	out := cmd.OutOrStdout()
	fmt.Fprintf(out, "Created key %s (name %q, tier %s, expires %s, mints %s, own settings %s) in %s.\n", rec.ID, rec.Name, rec.Tier,
		formatTime(rec.Expires, "never"), formatMint(rec.Mint, "no tokens"), setNames(&rec.Settings, "none"), spec)
	printSecret(out, secret)
	return nil
}

func cliList(cmd *cobra.Command, _ []string) error {
	st, spec, err := cliStore(cmd, false)
	if err != nil {
		return err
	}
	defer st.Close()
	recs, err := st.List(cmd.Context())
	if err != nil {
		return err
	}
	out := cmd.OutOrStdout()
	if len(recs) == 0 {
		fmt.Fprintf(out, "No keys in %s.\n", spec)
		return nil
	}
	now := time.Now()
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	// SETTINGS names the key's own settings (see key show).
	fmt.Fprintln(tw, "ID\tNAME\tTIER\tMINT\tCREATED\tEXPIRES\tLAST USED\tSTATE\tSETTINGS")
	for _, r := range recs {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", r.ID, printable(r.Name), r.Tier, formatMint(r.Mint, "-"),
			formatTime(r.Created, "-"), formatTime(r.Expires, "never"), formatTime(r.LastUsed, "never"), r.State(now), setNames(&r.Settings, "-"))
	}
	return tw.Flush()
}

func cliRevoke(cmd *cobra.Command, args []string) error {
	st, _, err := cliStore(cmd, false)
	if err != nil {
		return err
	}
	defer st.Close()
	if err := st.Revoke(cmd.Context(), args[0], time.Now()); err != nil {
		return err
	}
	fmt.Fprintf(cmd.OutOrStdout(), "Revoked key %s. A running Caddy refuses it within a second.\n", args[0])
	return nil
}

// cliUsage prints the ledger's rows of this month (UTC): of one key, or
// of every key in the store. The last second of use may still be on its
// way from a running Caddy.
func cliUsage(cmd *cobra.Command, args []string) error {
	st, _, err := cliStore(cmd, false)
	if err != nil {
		return err
	}
	defer st.Close()
	ids := args
	if len(ids) == 0 {
		recs, err := st.List(cmd.Context())
		if err != nil {
			return err
		}
		for _, r := range recs {
			ids = append(ids, r.ID)
		}
	}
	now := time.Now().UTC()
	since := store.Day(time.Date(now.Year(), now.Month(), 1, 0, 0, 0, 0, time.UTC))
	w := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 0, 2, ' ', 0)
	// CACHED is of PROMPT and REASONING of COMPLETION, where the
	// upstream reported them. COST is in units of the proxy's currency,
	// which the store does not know: 0 for usage of unpriced models.
	fmt.Fprintln(w, "KEY\tDAY\tMODEL\tREQUESTS\tPROMPT\tCACHED\tCOMPLETION\tREASONING\tTOTAL\tCOST")
	for _, id := range ids {
		rows, err := st.UsageSince(cmd.Context(), id, since)
		if err != nil {
			return err
		}
		for _, r := range rows {
			fmt.Fprintf(w, "%s\t%s\t%s\t%d\t%d\t%d\t%d\t%d\t%d\t%s\n", id, r.Day, printable(r.Model), r.Requests,
				r.PromptTokens, r.CachedTokens, r.CompletionTokens, r.ReasoningTokens, r.TotalTokens(), policy.FormatCost(r.Cost))
		}
	}
	return w.Flush()
}

// printable returns s as it is when every character of it prints as
// itself, and quoted with escapes otherwise: a name that a caller or an
// upstream chose must not forge rows or move the terminal's cursor.
func printable(s string) string {
	for _, r := range s {
		if !unicode.IsGraphic(r) {
			return strconv.Quote(s)
		}
	}
	return s
}

func cliRotate(cmd *cobra.Command, args []string) error {
	st, _, err := cliStore(cmd, false)
	if err != nil {
		return err
	}
	defer st.Close()
	secret, err := keys.Rotate(cmd.Context(), st, args[0])
	if err != nil {
		return err
	}
	out := cmd.OutOrStdout()
	fmt.Fprintf(out, "Rotated key %s: its old secret stops working within a second.\n", args[0])
	printSecret(out, secret)
	return nil
}

// cliSigningRotate adds a signing key and removes those retired more
// than MaxTokenTTL ago. It may make a new SQLite file, as key add does: a
// fleet's first signing key may come before its first client key.
func cliSigningRotate(cmd *cobra.Command, _ []string) error {
	st, spec, err := cliStore(cmd, true)
	if err != nil {
		return err
	}
	defer st.Close()
	k, removed, err := keys.RotateSigningKeys(cmd.Context(), st, time.Now())
	if err != nil {
		return err
	}
	out := cmd.OutOrStdout()
	fmt.Fprintf(out, "Added signing key %s in %s: a running Caddy signs new tokens with it in 2 seconds.\n", k.ID, spec)
	fmt.Fprintf(out, "Signing keys removed (retired more than %g hours ago): %d.\n", keys.MaxTokenTTL.Hours(), removed)
	return nil
}

// cliSigningList prints the signing keys and their states: current (the
// one that signs), signs from a time (newer, published but not signing
// yet), retired at a time (still verifying the tokens it signed), or
// expired (no token it signed is valid any more; the next rotate
// removes it).
func cliSigningList(cmd *cobra.Command, _ []string) error {
	st, spec, err := cliStore(cmd, false)
	if err != nil {
		return err
	}
	defer st.Close()
	signing, err := st.SigningKeys(cmd.Context())
	if err != nil {
		return err
	}
	out := cmd.OutOrStdout()
	if len(signing) == 0 {
		fmt.Fprintf(out, "No signing keys in %s.\n", spec)
		return nil
	}
	now := time.Now()
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tCREATED\tSTATE")
	current := keys.Signer(signing, now)
	for i, k := range signing {
		state := "current"
		switch retired := keys.Retired(signing, i); {
		case &signing[i] == current:
		case keys.ExpiredSigningKey(signing, i, now):
			state = "expired"
		case k.Created.After(current.Created):
			state = "signs from " + formatTime(k.Created.Add(keys.SigningGrace), "-")
		case !retired.IsZero():
			state = "retired " + formatTime(retired, "-")
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\n", printable(k.ID), formatTime(k.Created, "-"), state)
	}
	return tw.Flush()
}

func printSecret(out io.Writer, secret string) {
	fmt.Fprintf(out, "\n    %s\n\n", secret)
	fmt.Fprintln(out, "This secret is shown only now and cannot be recovered: keep it safe.")
	fmt.Fprintln(out, "Clients send it as: Authorization: Bearer <secret>")
}

// parseExpiry reads an expiry: empty for never, a duration from now
// (720h, 30d), or an RFC 3339 time. Errors wrap ErrInvalid.
func parseExpiry(s string, now time.Time) (time.Time, error) {
	if s == "" {
		return time.Time{}, nil
	}
	if t, err := time.Parse(time.RFC3339, s); err == nil {
		return t, nil
	}
	d, err := caddy.ParseDuration(s)
	if err != nil || d <= 0 {
		return time.Time{}, fmt.Errorf("%w: expiry '%s' is neither a positive duration (720h, 30d) nor an RFC 3339 time", store.ErrInvalid, s)
	}
	return now.Add(d), nil
}

// formatMint formats the tiers a key may mint tokens of, or none when
// it may mint none.
func formatMint(mint []string, none string) string {
	if len(mint) == 0 {
		return none
	}
	return store.JoinMint(mint)
}

// formatTime formats t for the key list, in UTC, or none when zero.
func formatTime(t time.Time, none string) string {
	if t.IsZero() {
		return none
	}
	return t.UTC().Format(time.RFC3339)
}
