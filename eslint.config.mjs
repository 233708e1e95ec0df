// Lint configuration: ESLint's and typescript-eslint's recommended rules over the
// sources and the tests (`npm run lint`, part of `npm test`; warnings fail it too).
import js from '@eslint/js';
import tseslint from 'typescript-eslint';
import globals from 'globals';

export default tseslint.config(
  { ignores: ['dist/**', 'node_modules/**', 'fixtures/**', 'coverage/**'] },
  js.configs.recommended,
  ...tseslint.configs.recommended,
  {
    files: ['**/*.{ts,mjs,js,cjs}'],
    languageOptions: { globals: { ...globals.node } },
    rules: {
      // a leading underscore marks a parameter or binding kept on purpose (callbacks, destructuring)
      '@typescript-eslint/no-unused-vars': [
        'error',
        { argsIgnorePattern: '^_', varsIgnorePattern: '^_', destructuredArrayIgnorePattern: '^_', caughtErrorsIgnorePattern: '^_' },
      ],
    },
  },
  {
    // bin/ and scripts/ are CommonJS or plain Node scripts
    files: ['bin/**/*.js', '**/*.cjs'],
    rules: { '@typescript-eslint/no-require-imports': 'off' },
  },
);
